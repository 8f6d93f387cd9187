"""``rlmask overlap``: overlaps of saved masks."""

from __future__ import annotations

import click

from rlmask._commands.common import (
    FILE,
    by_option,
    check_outputs,
    format_option,
    output_option,
    parse_name_map,
    render,
    user_errors,
)


@click.command("overlap")
@click.argument("masks", nargs=-1, required=True)
@by_option(
    "total",
    "Breakdown to print; for three or more masks, one row per ordered pair (and layer, "
    "module or tensor).",
)
@format_option(["table", "json", "csv", "parquet"])
@output_option
@click.option(
    "--common-only",
    is_flag=True,
    help="Compare only the tensors all masks share (same name and shape).",
)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw a figure to this image file: for two masks o1 and o2 per module type "
    "against chance (and the magnitude-matched baseline with --base; paper Table 3), for "
    "three or more the o1 matrix as a heatmap (Table 4).",
)
@click.option(
    "--base",
    metavar="CHECKPOINT",
    help="The checkpoint the masks were taken against; adds the magnitude-matched baseline "
    "o1_matched/o2_matched (same density in every binade of the base's values), and for three "
    "or more masks the mean o1 excess over it with a 95% interval (masks resampled).",
)
@click.option(
    "--name-map",
    multiple=True,
    metavar="FROM=TO",
    help="With --base: rewrite the base's name prefix FROM as TO (repeatable).",
)
@user_errors
def overlap_cmd(
    masks: tuple[str, ...],
    by: str,
    fmt: str,
    output: str | None,
    common_only: bool,
    plot: str | None,
    base: str | None,
    name_map: tuple[str, ...],
) -> None:
    """Overlap of subnetwork MASKS (paper §5) against the random baseline.

    For two masks: |I1|, |I2|, |I1 ∩ I2|, |I1 ∪ I2|, o1 = |I1 ∩ I2|/|I1|, o2 = |I1 ∩ I2|/|I2|,
    Jaccard, and the random baselines o1_random = density(I2), o2_random = density(I1).
    For more masks: N x N matrices of o1 (row covered by column), Jaccard, and lift
    (o1 over its random baseline); CSV, Parquet and JSON carry one row per ordered pair.

    \b
    Examples:
      rlmask overlap seed1.rlmask seed2.rlmask --by module
      rlmask overlap grpo.rlmask dpo.rlmask prime.rlmask --format json
      rlmask overlap s1.rlmask s2.rlmask s3.rlmask --by module --format csv -o pairs.csv
      rlmask overlap grpo.rlmask dpo.rlmask prime.rlmask --plot table4.png
      rlmask overlap seed1.rlmask seed2.rlmask --base base/      # + magnitude-matched baseline
      rlmask overlap s1.rlmask s2.rlmask s3.rlmask --base base/  # + mean excess, 95% interval
    """
    from rlmask._overlap import overlap, overlap_matrix

    if len(masks) < 2:
        raise click.UsageError("overlap needs at least two masks")
    check_outputs(fmt, output, plot, inputs=[*masks, base])
    if name_map and not base:
        raise click.UsageError("--name-map goes with --base")
    if len(masks) == 2:
        pair = overlap(
            masks[0],
            masks[1],
            common_only=common_only,
            base=base,
            name_map=parse_name_map(name_map),
        )
        render(pair, by, fmt, output)
        if plot:
            from rlmask.plot import overlap_figure

            overlap_figure(pair, plot)
    else:
        labels = [str(i + 1) for i in range(len(masks))]
        matrix = overlap_matrix(
            list(masks),
            labels=labels,
            common_only=common_only,
            base=base,
            name_map=parse_name_map(name_map),
        )
        render(matrix, by, fmt, output)
        if plot:
            from rlmask.plot import overlap_heatmap

            overlap_heatmap(matrix, plot)


command = overlap_cmd
