"""``rlmask demo``: finding 1, told on the bundled checkpoints."""

from __future__ import annotations

import click

from rlmask._commands.common import user_errors


@click.command("demo")
@user_errors
def demo() -> None:
    """Finding 1 on weights that training produced, told on the bundled checkpoints.

    The checkpoints come from examples/finding1/study.py: a 76k-parameter llama-shaped model
    pretrained on two-digit addition, then RL (TRL's GRPOTrainer, two seeds) and SFT (TRL's
    SFTTrainer) at the same learning rate. Each step prints the command that gives it.
    """
    from rlmask._diff import diff
    from rlmask._overlap import overlap
    from rlmask._trajectory import trajectory
    from rlmask.examples import trained_path

    base = trained_path("base")
    rel = {n: f"$EX/{n}" for n in ("base", "rl-seed1", "rl-seed2", "sft", "run-seed1")}
    click.echo(f"rlmask demo: RL and SFT on a tiny model (EX={base.parent})\n")

    click.echo("1. How much of the model did RL change, and SFT? (paper §2.2; exact and tol 1e-5)")
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

    click.echo(
        "\n2. Do two RL seeds update the same elements? (paper §5) Against chance, and against"
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

    click.echo("\n3. Why do elements stay unchanged? The magnitude lens: changed share per binade")
    report_lens = diff(base, trained_path("rl-seed1"), magnitude=True, progress=False)
    click.echo(f"$ rlmask diff {rel['base']} {rel['rl-seed1']} --by magnitude")
    for line in report_lens.lens_lines(min_numel=100):
        click.echo(f"   {line}")

    click.echo("\n4. How did the subnetwork grow over the run? (paper §6)")
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
    click.echo(
        "\nAt this scale the sparsity is mostly bf16 precision: the same RL run saved in fp32\n"
        "changes 99.8% of its elements, and most of the seeds' overlap is what their\n"
        "magnitudes alone predict. How each checkpoint was made is in its safetensors\n"
        'metadata (python -c "from safetensors import safe_open; ...metadata()").'
    )


command = demo
