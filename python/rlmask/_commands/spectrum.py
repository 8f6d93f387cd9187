"""``rlmask spectrum``: the geometry of each matrix's update."""

from __future__ import annotations

import click

from rlmask._commands.common import (
    FILE,
    by_option,
    check_outputs,
    format_option,
    output_option,
    pairing_options,
    parse_name_map,
    quiet_option,
    render,
    shared_rows_option,
    user_errors,
)


@click.command("spectrum")
@click.argument("base")
@click.argument("tuned", nargs=-1, required=True)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda, cuda:1, ...",
)
@click.option(
    "--randomized-above",
    type=click.IntRange(min=0),
    metavar="N",
    help="Matrices of more than N elements take the randomised path: D, W and W' decomposed "
    "to the top singular directions the measures use, by randomised range finding (much "
    "faster on large matrices; effective_rank, rank and spectral_drift are then null and the "
    "row's svd column says randomized; design §13 states the error). Default: every matrix "
    "exactly.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    metavar="S",
    default=0,
    show_default=True,
    help="Seed of the randomised path's sketches (with each matrix's name).",
)
@pairing_options
@shared_rows_option
@by_option("module", "Breakdown to print under the summary.")
@format_option(["table", "json", "csv", "parquet"])
@output_option
@click.option(
    "--plot",
    type=FILE,
    help="Also draw, per module type, the energy in the base's top 10% directions against "
    "the random-direction expectation, that subspace's rotation, and the rank-1 share.",
)
@quiet_option
@user_errors
def spectrum_cmd(
    base: str,
    tuned: tuple[str, ...],
    device: str,
    randomized_above: int | None,
    seed: int,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    skip_mismatched: bool,
    name_map: tuple[str, ...],
    shared_rows: bool,
    by: str,
    fmt: str,
    output: str | None,
    plot: str | None,
    quiet: bool,
) -> None:
    """The geometry of every update matrix TUNED - BASE: how the update sits relative to the
    base. Needs torch. TUNED may be several checkpoints, glob patterns or a run directory (as
    `rlmask trajectory` takes them): one row per checkpoint and matrix, the base's SVD once per
    matrix, and rank1_alignment, the stability of the update's top direction against the last
    checkpoint.

    Per 2-D matrix D = W' - W: its norm against the base's, spectral norm, stable and
    effective rank, the energy share of its top 1..64 singular directions (the rank-1 share),
    the share of its energy in the base's top 1%, 5%, 10% and 20% singular directions (left,
    right and both; a random update puts r^2 there), the rotation of those subspaces, the
    drift of the base's spectrum, the share of its energy in its largest 0.1%, 1% and 5%
    coordinates, and how its changed elements favour the base's principal or low-magnitude
    entries (design §13). Breakdowns pool energy shares by each matrix's update energy.

    \b
    Examples:
      rlmask spectrum base/ grpo/
      rlmask spectrum base/ sft/ --by module --format csv -o sft.csv
      rlmask spectrum base/ grpo/ --format json -o spectrum.json
      rlmask spectrum base/ grpo/ --plot geometry.png
      rlmask spectrum base/ runs/grpo/ --format csv -o over-the-run.csv
      rlmask spectrum base/ grpo/ --randomized-above 4000000
    """
    from rlmask._spectrum import spectrum

    check_outputs(fmt, output, plot, inputs=[base, *tuned])
    report = spectrum(
        base,
        tuned[0] if len(tuned) == 1 else list(tuned),
        device=device,
        include=include or None,
        exclude=exclude or None,
        name_map=parse_name_map(name_map),
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
        randomized_above=randomized_above,
        seed=seed,
        progress=not quiet,
    )
    render(report, by, fmt, output)
    if plot:
        report.plot(plot)


command = spectrum_cmd
