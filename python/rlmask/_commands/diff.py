"""``rlmask diff``: update sparsity of one checkpoint against another."""

from __future__ import annotations

import click

from rlmask._commands.common import (
    FILE,
    LEVELS,
    block_option,
    by_option,
    check_outputs,
    criterion_options,
    format_option,
    output_option,
    pairing_options,
    parse_block,
    parse_name_map,
    parse_tolerances,
    quiet_option,
    render,
    sample_options,
    shared_rows_option,
    tol_option,
    user_errors,
)


@click.command("diff")
@click.argument("base")
@click.argument("tuned")
@tol_option
@click.option(
    "--sweep",
    is_flag=True,
    help="Also compute the paper's Table 6 sweep (1e-8, 1e-7, 1e-6, 1e-5), in the same pass.",
)
@click.option(
    "--tolerances",
    metavar="T1,T2,...",
    help="Comma-separated absolute tolerances to compute in the same pass.",
)
@criterion_options
@by_option(
    "total",
    "Breakdown to print: whole model, per layer, per module type, per tensor, per component "
    "(language model, vision tower, projector), per routed expert of a mixture-of-experts "
    "model (layer and expert), or per binade of the base value (magnitude: the precision lens, "
    "computed in the same pass; the JSON report then carries by_magnitude, and --plot draws "
    "the lens).",
    (*LEVELS, "component", "expert", "magnitude"),
)
@format_option(["table", "json", "csv", "parquet"])
@output_option
@pairing_options
@shared_rows_option
@block_option
@click.option(
    "--save-mask",
    type=FILE,
    help="Also write the changed elements at --tol (the subnetwork) to this .rlmask file, "
    "from the same pass.",
)
@click.option(
    "--as-dtype",
    type=click.Choice(["bf16"]),
    help="Round every side stored wider (F32, F16, F64) to this dtype before comparing: "
    "what an engine loading the checkpoints in BF16 sees (fp32 weights move almost "
    "everywhere; the paper's figures are about BF16).",
)
@click.option(
    "--null",
    is_flag=True,
    help="Also compute the precision null: the sparsity that bf16 rounding alone predicts. "
    "Each tensor's accumulated fp32 update (MASTER - BASE) is placed at random within the "
    "tensor, added to BASE and rounded as TUNED is stored; the expected changed count is "
    "exact, per tensor, module and binade (columns predicted_changed and predicted_sparsity; "
    "JSON null). Without --master the updates are fitted from the checkpoints: the moves of "
    "each tensor's quarter of elements nearest zero stand in for its updates, assuming update "
    "sizes do not depend on the weight's magnitude (an estimate that leans towards too much "
    "sparsity).",
)
@click.option(
    "--master",
    type=click.Path(),
    metavar="MASTER",
    help="The run's fp32 weights behind TUNED (an fp32 save, or the optimizer's master copy "
    "exported as safetensors), for --null and the displacement |MASTER - BASE|.",
)
@click.option(
    "--displacement",
    is_flag=True,
    help="Also report the distribution of |update| (median, p90, p99, mean, max): "
    "|MASTER - BASE| with --master, else |TUNED - BASE|; compare runs at equal displacement, "
    "not equal steps.",
)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw sparsity per layer and module type (paper Figure 3) to this image file "
    "(PNG, PDF, SVG by extension; needs matplotlib).",
)
@sample_options
@quiet_option
@user_errors
def diff_cmd(
    base: str,
    tuned: str,
    tol: float | None,
    sweep: bool,
    tolerances: str | None,
    criterion: str,
    eta: float | None,
    by: str,
    fmt: str,
    output: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    skip_mismatched: bool,
    name_map: tuple[str, ...],
    shared_rows: bool,
    block_size: str | None,
    save_mask: str | None,
    as_dtype: str | None,
    null: bool,
    master: str | None,
    displacement: bool,
    plot: str | None,
    sample: str | None,
    seed: int,
    quiet: bool,
) -> None:
    """Update sparsity of TUNED against BASE (paper §2.2).

    BASE and TUNED are each a .safetensors file, a checkpoint directory (sharded or not), an
    index file, or a Hugging Face repo id org/name[@revision] already in the local hub cache
    (nothing is downloaded).

    \b
    Examples:
      rlmask diff meta-llama/Llama-3.1-8B ./grpo-run/checkpoint-500
      rlmask diff base/ tuned/ --sweep --by module
      rlmask diff base/ tuned/ --format json -o report.json
      rlmask diff base/ tuned/ --by layer --format csv --include 'mlp\\.'
      rlmask diff base/ tuned/ --save-mask grpo.rlmask
      rlmask diff base/ tuned/ --by magnitude --plot lens.png
      rlmask diff base/ tuned/ --null --master tuned-fp32/ --by magnitude
      rlmask diff base/ tuned/ --sample 1% --by module
    """
    from rlmask._diff import DEFAULT_SWEEP, DiffOptions, run_diff

    extra = parse_tolerances(tolerances) + (list(DEFAULT_SWEEP) if sweep else [])
    options = DiffOptions.build(
        tol=tol,
        tolerances=extra or None,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        include=include or None,
        exclude=exclude or None,
        name_map=parse_name_map(name_map),
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
        block_size=parse_block(block_size),
        save_mask=save_mask,
        magnitude=by == "magnitude",
        as_dtype=as_dtype,
        null=null,
        master=master,
        displacement=displacement,
        sample=sample,
        seed=seed,
    )
    inputs = [base, tuned, *([master] if master else [])]
    check_outputs(fmt, output, plot, inputs=inputs, others=[save_mask])
    report = run_diff(base, tuned, options, progress=not quiet)
    render(report, by, fmt, output)
    if plot:
        from rlmask.plot import magnitude_figure, sparsity_by_layer

        draw = magnitude_figure if by == "magnitude" else sparsity_by_layer
        draw(report, plot)


command = diff_cmd
