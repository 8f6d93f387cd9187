"""``rlmask rank``: the rank of each matrix's update."""

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


@click.command("rank")
@click.argument("base")
@click.argument("tuned")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda, cuda:1, ...",
)
@click.option("--rtol", type=float, help="Relative rank tolerance, as torch.linalg.matrix_rank.")
@click.option("--atol", type=float, help="Absolute rank tolerance, as torch.linalg.matrix_rank.")
@click.option(
    "--top-k",
    type=int,
    default=8,
    show_default=True,
    help="k of the energy_topk column (energy share of the top k directions).",
)
@click.option("--skip-embeddings", is_flag=True, help="Leave out embed_tokens and lm_head.")
@pairing_options
@shared_rows_option
@by_option("module", "Breakdown to print under the summary.")
@format_option(["table", "json", "csv"])
@output_option
@click.option(
    "--plot",
    type=FILE,
    help="Also draw the mean rank fraction per module and every matrix's singular-value "
    "energy curve to this image file.",
)
@quiet_option
@user_errors
def rank_cmd(
    base: str,
    tuned: str,
    device: str,
    rtol: float | None,
    atol: float | None,
    top_k: int,
    skip_embeddings: bool,
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
    """Rank of every update matrix TUNED - BASE (paper §3, Table 2). Needs torch.

    Per 2-D tensor: rank as torch.linalg.matrix_rank computes it, rank / min(m, n), the
    largest singular value, stable rank, entropy effective rank and the energy share of the
    top 1 and top k singular directions. The model figure is the mean rank fraction. Reads one
    matrix at a time (batches of same-shaped matrices on CUDA). Tensors pair as in
    `rlmask diff` (wrapper segments removed, --name-map applied).

    \b
    Examples:
      rlmask rank base/ tuned/
      rlmask rank base/ tuned/ --device cuda --by layer --format csv -o ranks.csv
      rlmask rank base/ tuned/ --plot rank.png
    """
    from rlmask._rank import rank

    check_outputs(fmt, output, plot, inputs=[base, tuned])
    report = rank(
        base,
        tuned,
        device=device,
        rtol=rtol,
        atol=atol,
        top_k=top_k,
        skip_embeddings=skip_embeddings,
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
        name_map=parse_name_map(name_map),
        include=include or None,
        exclude=exclude or None,
        progress=not quiet,
    )
    render(report, by, fmt, output)
    if plot:
        from rlmask.plot import rank_figure

        rank_figure(report, plot)


command = rank_cmd
