"""``rlmask demo``: finding 1, told on the bundled checkpoints."""

from __future__ import annotations

import click

from rlmask._commands.common import user_errors


@click.command("demo")
@user_errors
def demo() -> None:
    """Finding 1 on weights that training produced, told on the bundled checkpoints.

    The checkpoints come from examples/finding1/study.py: a 76k-parameter llama-shaped model
    pretrained on two-digit addition, then RL (TRL's GRPOTrainer; two of the study's five
    seeds, and seed 1's fp32 master weights) and SFT (TRL's SFTTrainer, the run matched to
    RL's KL from the base) at the same learning rate. Each step prints the command that gives
    it; every figure is computed here, from the bundled files.
    """
    from rlmask._diff import diff
    from rlmask._overlap import overlap
    from rlmask._trajectory import trajectory
    from rlmask.examples import trained_path

    base = trained_path("base")
    rel = {
        n: f"$EX/{n}"
        for n in ("base", "rl-seed1", "rl-seed1-master", "rl-seed2", "sft", "run-seed1")
    }
    click.echo(f"rlmask demo: RL and SFT on a tiny model (EX={base.parent})\n")

    click.echo(
        "1. How much of the model did RL change, and SFT matched to RL's KL from the base?"
        " (paper §2.2)"
    )
    lines = []
    for name in ("rl-seed1", "rl-seed2", "sft"):
        exact = diff(base, trained_path(name), criterion="exact", progress=False)
        tol = diff(base, trained_path(name), progress=False)
        lines.append(
            f"   {name:<9} sparsity {100 * exact.sparsity:6.2f}% exact, "
            f"{100 * tol.sparsity:6.2f}% at 1e-5"
        )
    click.echo(
        f"$ rlmask diff {rel['base']} {rel['rl-seed1']} --criterion exact   # and the others"
    )
    click.echo("\n".join(lines))

    click.echo("\n2. How much of that would bf16 rounding alone give? The precision null places")
    click.echo("   each tensor's fp32 update (master - base) at random and rounds it to bf16:")
    null = diff(
        base,
        trained_path("rl-seed1"),
        null=True,
        master=trained_path("rl-seed1-master"),
        progress=False,
    )
    ns = null.null_summary()
    assert ns is not None
    click.echo(
        f"$ rlmask diff {rel['base']} {rel['rl-seed1']} --null --master {rel['rl-seed1-master']}"
    )
    click.echo(
        f"   rl-seed1 sparsity {100 * ns['observed_sparsity']:.2f}% observed, "
        f"{100 * ns['predicted_sparsity']:.2f}% predicted by rounding alone"
    )

    click.echo(
        "\n3. Do two RL seeds update the same elements? (paper §5) Against chance, and against"
    )
    click.echo("   masks with the same density in every binade of the base's values (design §8):")
    s1 = diff(base, trained_path("rl-seed1"), mask=True, progress=False).mask
    s2 = diff(base, trained_path("rl-seed2"), mask=True, progress=False).mask
    assert s1 is not None and s2 is not None
    t = overlap(s1, s2, base=base).total
    click.echo(f"$ rlmask diff {rel['base']} {rel['rl-seed1']} --save-mask seed1.rlmask")
    click.echo(f"$ rlmask diff {rel['base']} {rel['rl-seed2']} --save-mask seed2.rlmask")
    click.echo(f"$ rlmask overlap seed1.rlmask seed2.rlmask --base {rel['base']}")
    click.echo(
        f"   o1 = {100 * t['o1']:.1f}%   uniform baseline {100 * t['o1_random']:.1f}%   "
        f"magnitude-matched {100 * t['o1_matched']:.1f}%"
    )

    click.echo(
        "\n4. Why do elements stay unchanged? The magnitude lens: changed share per binade of"
    )
    click.echo("   the base value, and the share the precision null predicts:")
    click.echo(
        f"$ rlmask diff {rel['base']} {rel['rl-seed1']} --by magnitude --null "
        f"--master {rel['rl-seed1-master']}"
    )
    for line in null.lens_lines(min_numel=100):
        click.echo(f"   {line}")

    click.echo("\n5. How did the subnetwork grow over the run? (paper §6)")
    run = trajectory(base, trained_path("run-seed1"), progress=False)
    click.echo(f"$ rlmask trajectory {rel['base']} {rel['run-seed1']}")
    for r in run.total_frame().iter_rows(named=True):
        click.echo(
            f"   step {r['step']:>4}: sparsity {100 * r['sparsity_vs_base']:6.2f}% vs base, "
            f"{100 * r['sparsity_consecutive']:6.2f}% vs previous"
        )
    c, n = run.categories, run.numel
    click.echo(
        f"   never changed {100 * c['never'] / n:.1f}%, changed then returned "
        f"{100 * c['returned'] / n:.1f}%, final subnetwork {100 * c['final'] / n:.1f}%"
    )
    gap = 100 * (ns["observed_sparsity"] - ns["predicted_sparsity"])
    excess = 100 * (t["o1"] - t["o1_matched"])
    click.echo(
        f"\nOn these checkpoints, rounding alone predicts RL's sparsity to {gap:+.2f} points, and\n"
        f"the seeds' overlap exceeds what their magnitudes predict by {excess:+.1f} points (one\n"
        "pair; the Finding 1 study that made these checkpoints reports five seeds with\n"
        "intervals, RL against SFT at matched KL, and Conjecture 1 against random masks of the\n"
        "same counts).\n"
        "How each checkpoint was made is in its safetensors metadata\n"
        '(python -c "from safetensors import safe_open; ...metadata()").'
    )


command = demo
