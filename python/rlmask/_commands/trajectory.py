"""``rlmask trajectory``: a run's checkpoints in one pass."""

from __future__ import annotations

import click

from rlmask._commands.common import (
    DIRECTORY,
    FILE,
    block_option,
    by_option,
    check_outputs,
    criterion_options,
    format_option,
    output_option,
    pairing_options,
    parse_block,
    parse_name_map,
    quiet_option,
    render,
    tol_option,
    user_errors,
)


@click.command("trajectory")
@click.argument("base")
@click.argument("checkpoints", nargs=-1, required=True)
@tol_option
@criterion_options
@by_option(
    "total",
    "Breakdown to print: per checkpoint for the whole model, or per layer, "
    "module type or tensor and checkpoint.",
)
@format_option(["table", "json", "csv", "parquet"])
@output_option
@pairing_options
@block_option
@click.option(
    "--save-masks",
    type=DIRECTORY,
    help="Also write each checkpoint's mask against BASE into this directory "
    "(step-<n>.rlmask), from the same pass.",
)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw the run's figure (sparsity against the base and the previous checkpoint, "
    "the three categories, the share outside the final subnetwork) to this image file.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: cut the run into --segments, each a Ray task on a node that sees the files.",
)
@click.option("--segments", type=click.IntRange(min=1), help="Ray segments [default: K/8].")
@click.option(
    "--shared-dir",
    type=DIRECTORY,
    help="With --executor ray: a folder every node sees, for the final and segment masks "
    "[default: --save-masks, else a local temporary folder].",
)
@click.option("--ray-address", help="Ray cluster to join (default: start a local one).")
@quiet_option
@user_errors
def trajectory_cmd(
    base: str,
    checkpoints: tuple[str, ...],
    tol: float | None,
    criterion: str,
    eta: float | None,
    by: str,
    fmt: str,
    output: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    skip_mismatched: bool,
    name_map: tuple[str, ...],
    block_size: str | None,
    save_masks: str | None,
    plot: str | None,
    executor: str,
    segments: int | None,
    shared_dir: str | None,
    ray_address: str | None,
    quiet: bool,
) -> None:
    """How sparsity evolves over a run (paper §6, Figures 2, 5, 6, 7).

    Compares every checkpoint with BASE and with the checkpoint before it, in one pass that
    reads each file once. CHECKPOINTS are checkpoints, glob patterns, or a run directory
    holding checkpoint-<step>/ (or global_step_<n>, step_<n>, iter_<n>) folders; they are
    ordered by step when every name carries one.

    \b
    Examples:
      rlmask trajectory Qwen/Qwen2.5-Math-7B runs/grpo/
      rlmask trajectory base/ 'runs/grpo/checkpoint-*' --format json -o run.json
      rlmask trajectory base/ runs/grpo/ --by module --plot run.png --save-masks masks/
      rlmask trajectory base/ /shared/runs/grpo/ --executor ray --ray-address auto \\
          --shared-dir /shared/tmp
    """
    from rlmask._trajectory import TrajectoryOptions, run_trajectory

    options = TrajectoryOptions.build(
        tol=tol,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        include=include or None,
        exclude=exclude or None,
        name_map=parse_name_map(name_map),
        skip_mismatched=skip_mismatched,
        block_size=parse_block(block_size),
    )
    check_outputs(fmt, output, plot, inputs=[base, *checkpoints], others=[save_masks])
    report = run_trajectory(
        base,
        list(checkpoints),
        options,
        save_masks=save_masks,
        progress=not quiet,
        executor=executor,
        segments=segments,
        shared_dir=shared_dir,
        ray_address=ray_address,
    )
    render(report, by, fmt, output)
    if plot:
        from rlmask.plot import trajectory_figure

        trajectory_figure(report, plot)


command = trajectory_cmd
