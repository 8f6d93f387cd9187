"""``rlmask survey``: many checkpoint pairs, locally or on Ray."""

from __future__ import annotations

from typing import Any

import click

from rlmask._commands.common import (
    DIRECTORY,
    FILE,
    check_outputs,
    criterion_options,
    format_option,
    output_option,
    parse_name_map,
    parse_tolerances,
    quiet_option,
    render,
    sample_options,
    tol_option,
    user_errors,
)


@click.command("survey")
@click.argument("manifest", type=FILE)
@tol_option
@click.option(
    "--sweep",
    is_flag=True,
    help="Compute the paper's Table 6 sweep (1e-8 ... 1e-5) for every pair, in its one pass.",
)
@click.option("--tolerances", metavar="T1,T2,...", help="More absolute tolerances per pair.")
@criterion_options
@click.option(
    "--by",
    type=click.Choice(["pair", "group"]),
    default="pair",
    show_default=True,
    help="One row per pair and tolerance, or per group (numel-weighted, mean, min, max).",
)
@format_option(["table", "json", "csv", "parquet"])
@output_option
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Pairs compared at once (local executor).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: one Ray task per pair (nodes must see the files at the same paths).",
)
@click.option("--ray-address", help="Ray cluster to join (default: start a local one).")
@click.option(
    "--cache",
    type=DIRECTORY,
    help="Directory of per-pair results for resuming [default: MANIFEST.cache].",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write cached results.")
@click.option(
    "--name-map",
    multiple=True,
    metavar="FROM=TO",
    help="Rewrite the name prefix FROM as TO on both sides of every pair before pairing "
    "(repeatable).",
)
@click.option(
    "--skip-mismatched",
    is_flag=True,
    help="List tensors whose shapes or dtypes differ as skipped instead of failing the pair.",
)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw sparsity per pair, coloured by group (paper Figure 1), to this image file.",
)
@sample_options
@quiet_option
@user_errors
def survey_cmd(
    manifest: str,
    tol: float | None,
    sweep: bool,
    tolerances: str | None,
    criterion: str,
    eta: float | None,
    by: str,
    fmt: str,
    output: str | None,
    jobs: int,
    executor: str,
    ray_address: str | None,
    cache: str | None,
    no_cache: bool,
    name_map: tuple[str, ...],
    skip_mismatched: bool,
    plot: str | None,
    sample: str | None,
    seed: int,
    quiet: bool,
) -> None:
    """Update sparsity of many pairs (paper Table 1, Table 6, Figure 1).

    MANIFEST is a TOML file of [[pair]] tables, or a CSV file with a header row, with keys
    name, base, tuned and optional group, include, exclude. Results are cached per pair (keyed
    by the options and every shard's size, time and header), so an interrupted survey resumes
    where it stopped; a pair that fails is reported in its row and the others go on (the exit
    code is then 1).

    \b
    Example manifest (survey.toml):
      [[pair]]
      name = "R1-Zero"
      base = "deepseek-ai/DeepSeek-V3-Base"
      tuned = "deepseek-ai/DeepSeek-R1-Zero"
      group = "GRPO"

    \b
    Examples:
      rlmask survey survey.toml --sweep
      rlmask survey survey.toml --by group --format csv -o groups.csv --plot figure1.png
      rlmask survey survey.toml --executor ray --ray-address auto
    """
    from rlmask._diff import DEFAULT_SWEEP, DiffOptions
    from rlmask._survey import load_manifest, run_survey

    extra = parse_tolerances(tolerances) + (list(DEFAULT_SWEEP) if sweep else [])
    options = DiffOptions.build(
        tol=tol,
        tolerances=extra or None,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        name_map=parse_name_map(name_map),
        skip_mismatched=skip_mismatched,
        sample=sample,
        seed=seed,
    )
    # Every pair's checkpoints are inputs too: no output, figure or cache may land in one.
    sides = [side for pair in load_manifest(manifest) for side in (pair.base, pair.tuned)]
    check_outputs(fmt, output, plot, inputs=[manifest, *sides], others=[cache])
    if no_cache and cache:
        raise click.UsageError("--cache and --no-cache exclude each other")

    def note(pair: Any, status: str) -> None:
        if not quiet:
            click.echo(f"  {pair.name}: {status}", err=True)

    report = run_survey(
        manifest,
        options,
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
        cache="" if no_cache else cache,
        on_result=note,
    )
    render(report, by, fmt, output)
    if plot:
        from rlmask.plot import survey_figure

        survey_figure(report, plot)
    if report.failed:
        click.echo(
            f"rlmask: {len(report.failed)} pairs failed: {', '.join(report.failed)}", err=True
        )
        raise click.exceptions.Exit(1)


command = survey_cmd
