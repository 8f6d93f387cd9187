"""The ``rlmask`` command line.

Exit codes: 0 on success, 1 on a data error (one line on stderr, no traceback), 2 on a usage
error.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from rlmask import __version__
from rlmask._diff import DEFAULT_SWEEP, DEFAULT_TOL, DiffReport, diff
from rlmask._io import write_text_atomic
from rlmask._table import format_frame
from rlmask.errors import RlmaskError

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = ("total", "layer", "module", "tensor")


def _user_errors(fn: F) -> F:
    """Turns errors about the user's inputs into one-line messages and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RlmaskError as e:
            raise click.ClickException(str(e)) from None
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        except OSError as e:
            raise click.ClickException(
                f"{e.filename}: {e.strerror}" if e.filename else str(e)
            ) from None

    return wrapper  # type: ignore[return-value]


def _parse_tolerances(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(
            f"'{text}' is not a comma-separated list of numbers", param_hint="--tolerances"
        ) from None


def _emit(text: str, output: str | None) -> None:
    if output:
        write_text_atomic(output, text if text.endswith("\n") else text + "\n")
    else:
        click.echo(text)


def _render(report: DiffReport, by: str, fmt: str, output: str | None) -> None:
    if fmt == "json":
        _emit(report.to_json(), output)
    elif fmt == "csv":
        _emit(report.to_csv(by=by), output)  # type: ignore[arg-type]
    elif fmt == "parquet":
        if not output:
            raise click.UsageError("--format parquet needs -o FILE")
        report.to_parquet(output, by=by)  # type: ignore[arg-type]
    else:
        parts = [report.summary()]
        if by != "total":
            parts += ["", f"by {by}:", format_frame(report.by(by))]  # type: ignore[arg-type]
        _emit("\n".join(parts), output)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rlmask")
def cli() -> None:
    """What did RL actually change in this model?

    rlmask compares safetensors checkpoints without loading them into memory and reports the
    paper's update sparsity: the share of parameters that finetuning left unchanged.

    Start with `rlmask demo`, then `rlmask diff BASE TUNED --help`.
    """


@cli.command("diff")
@click.argument("base")
@click.argument("tuned")
@click.option(
    "--tol",
    type=float,
    default=DEFAULT_TOL,
    show_default=True,
    help="Absolute tolerance: an element is unchanged if its bits are identical or "
    "|a - b| <= tol (computed in float32; float64 for F64 tensors).",
)
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
@click.option(
    "--criterion",
    type=click.Choice(["absolute", "exact", "relative"]),
    default="absolute",
    show_default=True,
    help="absolute: |a-b| <= tol; exact: identical bits only; relative: |a-b| <= eta*max(|a|,|b|).",
)
@click.option("--eta", type=float, help="Relative tolerance (required by --criterion relative).")
@click.option(
    "--by",
    type=click.Choice(LEVELS),
    default="total",
    show_default=True,
    help="Breakdown to print: whole model, per layer, per module type, or per tensor.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv", "parquet"]),
    default="table",
    show_default=True,
    help="json prints the full machine-readable report whatever --by says.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write to FILE (atomically) instead of stdout.",
)
@click.option(
    "--include",
    multiple=True,
    metavar="REGEX",
    help="Only tensors whose name matches (repeatable).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="REGEX",
    help="Skip tensors whose name matches (repeatable).",
)
@click.option(
    "--skip-mismatched",
    is_flag=True,
    help="List tensors whose shapes or dtypes differ as skipped instead of failing.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def diff_cmd(
    base: str,
    tuned: str,
    tol: float,
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
    """
    extra = _parse_tolerances(tolerances) + (list(DEFAULT_SWEEP) if sweep else [])
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet needs -o FILE")
    report = diff(
        base,
        tuned,
        tol=tol,
        tolerances=extra or None,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        include=include or None,
        exclude=exclude or None,
        skip_mismatched=skip_mismatched,
        progress=not quiet,
    )
    _render(report, by, fmt, output)


@cli.command()
@click.option(
    "--by",
    type=click.Choice(LEVELS),
    default="module",
    show_default=True,
    help="Breakdown to print.",
)
@_user_errors
def demo(by: str) -> None:
    """Run `rlmask diff --sweep` on the bundled example checkpoints.

    The examples are a tiny llama-shaped model with synthetic updates (see the README); use
    `rlmask diff` on your own checkpoints for real figures.
    """
    from rlmask.examples import example_path

    base, tuned = example_path("base"), example_path("tuned-seed1")
    click.echo("rlmask demo: synthetic tiny-llama example bundled with the package")
    click.echo(f"$ rlmask diff {base} {tuned} --sweep --by {by}\n")
    report = diff(base, tuned, tolerances=DEFAULT_SWEEP, progress=False)
    _render(report, by, "table", None)


def main() -> None:
    """Entry point of the ``rlmask`` command."""
    cli.main(prog_name="rlmask")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
