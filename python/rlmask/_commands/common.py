"""What the commands share: options, argument checks, error handling and report output."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from rlmask._io import check_not_input, check_output, write_text_atomic
from rlmask._rlmask import CRITERIA, DEFAULT_TOL, printable
from rlmask.errors import OutputError, RlmaskError

if TYPE_CHECKING:
    from rlmask._report import Report

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = ("total", "layer", "module", "tensor")

# One instance of each path type for every option: click looks up a translation of the type's
# name for each one it builds (gettext, with a stat per candidate catalogue); fifteen cost 2.4M
# instructions and 54 system calls more at every start.
FILE = click.Path(dir_okay=False)
DIRECTORY = click.Path(file_okay=False)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM, so that it unwinds like Ctrl-C: the running pass is
    cancelled and no output or temporary file is left."""


def user_errors(fn: F) -> F:
    """Turns errors about the user's inputs into one-line messages (control characters
    escaped) and the right exit code: 1 for data and output errors, 2 for usage errors, 130
    after Ctrl-C and 143 after SIGTERM."""

    def fail(message: str) -> click.ClickException:
        return click.ClickException(printable(message))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            click.echo(
                f"rlmask: {'terminated' if terminated else 'interrupted'}; nothing was written",
                err=True,
            )
            raise click.exceptions.Exit(143 if terminated else 130) from None
        except RlmaskError as e:
            raise fail(str(e)) from None
        except ValueError as e:
            raise click.UsageError(printable(str(e))) from None
        except ImportError as e:
            raise fail(str(e)) from None
        except OSError as e:
            raise fail(f"{e.filename}: {e.strerror}" if e.filename else str(e)) from None

    return wrapper  # type: ignore[return-value]


def options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Applies several click decorators, in the order they are listed."""

    def apply(fn: F) -> F:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def format_option(choices: list[str]) -> Callable[[F], F]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default="table",
        show_default=True,
        help="json prints the full machine-readable report whatever --by says.",
    )


def by_option(default: str, help: str, levels: tuple[str, ...] = LEVELS) -> Callable[[F], F]:
    return click.option(
        "--by", type=click.Choice(levels), default=default, show_default=True, help=help
    )


output_option = click.option(
    "-o",
    "--output",
    type=FILE,
    help="Write to FILE (atomically) instead of stdout.",
)
select_options = options(
    click.option(
        "--include",
        multiple=True,
        metavar="REGEX",
        help="Only tensors whose name matches (repeatable).",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Skip tensors whose name matches (repeatable).",
    ),
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
tol_option = click.option(
    "--tol",
    type=float,
    help=f"Absolute tolerance [default: {DEFAULT_TOL:g}]: an element is unchanged if its bits "
    "are identical or |a - b| <= tol (computed in float32; float64 for F64 tensors). "
    "Absolute criterion only.",
)
criterion_options = options(
    click.option(
        "--criterion",
        type=click.Choice(CRITERIA),
        default="absolute",
        show_default=True,
        help="absolute: |a-b| <= tol; exact: identical bits only; "
        "relative: |a-b| <= eta*max(|a|,|b|).",
    ),
    click.option(
        "--eta", type=float, help="Relative tolerance (required by --criterion relative)."
    ),
)
skip_option = click.option(
    "--skip-mismatched",
    is_flag=True,
    help="List tensors whose shapes or dtypes differ as skipped instead of failing.",
)
shared_rows_option = click.option(
    "--compare-shared-rows",
    "shared_rows",
    is_flag=True,
    help="Compare a tensor whose number of rows differs (a vocabulary resized between base "
    "and tuned: embed_tokens, lm_head) on the leading rows both share, and list its extra rows, "
    "instead of failing.",
)
block_option = click.option(
    "--block-size",
    metavar="RxC",
    help="Block size of block-scaled FP8 weights (NAME beside NAME_scale_inv or NAME_scale), "
    "e.g. 128x128; by default the checkpoints' config.json "
    "(quantization_config.weight_block_size) gives it. MXFP4 weights need none (32 codes "
    "per E8M0 scale).",
)
sample_options = options(
    click.option(
        "--sample",
        metavar="F",
        help="Estimate from a random sample instead of reading every element: a fraction of "
        "each tensor (1%, 0.01) or a byte budget of both checkpoints (2GB), read in contiguous "
        "blocks; every figure then comes with a 95% interval (design §14).",
    ),
    click.option(
        "--seed",
        type=click.IntRange(0, 2**64 - 1),
        metavar="S",
        default=0,
        show_default=True,
        help="Seed of --sample (the same seed reads the same blocks).",
    ),
)
pairing_options = options(
    select_options,
    skip_option,
    click.option(
        "--name-map",
        multiple=True,
        metavar="FROM=TO",
        help="Rewrite the name prefix FROM as TO in every checkpoint before pairing "
        "(repeatable; 'base_model.model.=' drops a prefix, '=model.' adds one). Wrapper "
        "segments (DDP 'module.', FSDP, activation checkpointing, torch.compile) are always "
        "removed.",
    ),
)


def parse_block(text: str | None) -> tuple[int, int] | None:
    """``128x128`` as (128, 128)."""
    if text is None:
        return None
    from rlmask._options import check_block

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise click.UsageError(f"--block-size takes ROWSxCOLS, e.g. 128x128, not '{text}'")
    try:
        return check_block([int(p) for p in parts], "--block-size")
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def check_outputs(
    fmt: str,
    output: str | None,
    plot: str | None,
    *,
    inputs: Sequence[str | None] = (),
    others: Sequence[str | None] = (),
) -> None:
    """Every output is checked before minutes of reading, not after: it can be written, and
    it is none of the command's ``inputs`` (checkpoints, masks, patches, manifests) nor lies
    inside an input checkpoint folder (a usage error, exit 2). ``others`` are further outputs
    (a saved mask, a folder of masks) checked against the inputs."""
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet needs -o FILE")
    for target in (output, plot, *others):
        if target:
            try:
                check_not_input(target, inputs)
            except OutputError as e:
                raise click.UsageError(printable(str(e))) from None
    if output:
        check_output(output)
    if plot:
        from rlmask.plot import check_figure_path

        check_figure_path(plot)


def parse_tolerances(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(
            f"'{text}' is not a comma-separated list of numbers", param_hint="--tolerances"
        ) from None


def parse_name_map(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not FROM=TO", param_hint="--name-map")
        if old in out:
            raise click.BadParameter(f"prefix '{old}' given twice", param_hint="--name-map")
        out[old] = new
    return out


def emit(text: str, output: str | None) -> None:
    if output:
        write_text_atomic(output, text if text.endswith("\n") else text + "\n")
    else:
        click.echo(text)


def render(report: Report, by: str, fmt: str, output: str | None) -> None:
    """Prints or writes a report: JSON (everything), CSV or Parquet (the ``by`` breakdown), or
    a table (the summary, then the ``by`` breakdown)."""
    if fmt == "json":
        emit(report.to_json(), output)
    elif fmt == "csv":
        emit(report.to_csv(by=by), output)  # type: ignore[arg-type]
    elif fmt == "parquet":
        if not output:
            raise click.UsageError("--format parquet needs -o FILE")
        report.to_parquet(output, by=by)  # type: ignore[arg-type]
    else:
        from rlmask._table import format_frame

        parts = [report.summary()]
        if by == "magnitude":
            from rlmask._diff import DiffReport

            assert isinstance(report, DiffReport)
            parts += [
                "",
                f"changed share per binade of the base value, at {report.label(report.tol)} "
                "(the magnitude lens; files carry the counts):",
                *report.lens_lines(),
            ]
        elif by != "total":
            table = report.by(by)  # type: ignore[arg-type]
            # A sweep's per-tolerance counts make the table too wide to read; files keep them.
            table = table.select(
                c
                for c in table.columns
                if not c.startswith("changed@") and c not in report.table_hidden
            )
            if table.height:
                parts += ["", f"by {by}:", format_frame(table)]
            elif by == "expert":
                parts += [
                    "",
                    "by expert: no tensor belongs to a routed expert ('...experts.N...'): the "
                    "model is dense, or its experts are fused into one tensor (see --by module)",
                ]
            else:
                parts += ["", f"by {by}: no rows"]
        emit("\n".join(parts), output)
