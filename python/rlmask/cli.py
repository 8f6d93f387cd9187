"""The ``rlmask`` command line.

Exit codes: 0 on success, 1 on a data error (one line on stderr, no traceback), 2 on a usage
error.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from rlmask._io import check_output, write_text_atomic
from rlmask._rlmask import (
    COMBINE_OPS,
    CRITERIA,
    DEFAULT_PATCH_CODEC,
    DEFAULT_TOL,
    PATCH_CODECS,
    __version__,
    printable,
)
from rlmask.errors import RlmaskError

if TYPE_CHECKING:
    from rlmask._report import Report

# The API (polars, numpy) is imported inside the commands, so that `rlmask --help` and
# `rlmask --version` start at the speed of click alone.

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


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _user_errors(fn: F) -> F:
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


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Applies several click decorators, in the order they are listed."""

    def apply(fn: F) -> F:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def _format_option(choices: list[str]) -> Callable[[F], F]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default="table",
        show_default=True,
        help="json prints the full machine-readable report whatever --by says.",
    )


def _by_option(default: str, help: str, levels: tuple[str, ...] = LEVELS) -> Callable[[F], F]:
    return click.option(
        "--by", type=click.Choice(levels), default=default, show_default=True, help=help
    )


_output_option = click.option(
    "-o",
    "--output",
    type=FILE,
    help="Write to FILE (atomically) instead of stdout.",
)
_select_options = _options(
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
_quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
_tol_option = click.option(
    "--tol",
    type=float,
    help=f"Absolute tolerance [default: {DEFAULT_TOL:g}]: an element is unchanged if its bits "
    "are identical or |a - b| <= tol (computed in float32; float64 for F64 tensors). "
    "Absolute criterion only.",
)
_criterion_options = _options(
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
_skip_option = click.option(
    "--skip-mismatched",
    is_flag=True,
    help="List tensors whose shapes or dtypes differ as skipped instead of failing.",
)
_shared_rows_option = click.option(
    "--compare-shared-rows",
    "shared_rows",
    is_flag=True,
    help="Compare a tensor whose number of rows differs (a vocabulary resized between base "
    "and tuned: embed_tokens, lm_head) on the leading rows both share, and list its extra rows, "
    "instead of failing.",
)
_block_option = click.option(
    "--block-size",
    metavar="RxC",
    help="Block size of block-scaled FP8 weights (NAME beside NAME_scale_inv or NAME_scale), "
    "e.g. 128x128; by default the checkpoints' config.json "
    "(quantization_config.weight_block_size) gives it.",
)
_pairing_options = _options(
    _select_options,
    _skip_option,
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


def _check_criterion(
    criterion: str, tol: float | None, eta: float | None, tolerances: list[float]
) -> None:
    """Options the criterion would ignore are usage errors (the core's rules, checked before
    any file is opened)."""
    try:
        from rlmask._diff import parse_criterion

        parse_criterion(criterion, tol, tolerances, eta)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _parse_block(text: str | None) -> tuple[int, int] | None:
    """``128x128`` as (128, 128)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.UsageError(f"--block-size takes ROWSxCOLS, e.g. 128x128, not '{text}'")
    return int(parts[0]), int(parts[1])


def _check_outputs(fmt: str, output: str | None, plot: str | None) -> None:
    """Every output is checked before minutes of reading, not after."""
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet needs -o FILE")
    if output:
        check_output(output)
    if plot:
        from rlmask.plot import check_figure_path

        check_figure_path(plot)


def _parse_tolerances(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(
            f"'{text}' is not a comma-separated list of numbers", param_hint="--tolerances"
        ) from None


def _parse_name_map(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not FROM=TO", param_hint="--name-map")
        if old in out:
            raise click.BadParameter(f"prefix '{old}' given twice", param_hint="--name-map")
        out[old] = new
    return out


def _emit(text: str, output: str | None) -> None:
    if output:
        write_text_atomic(output, text if text.endswith("\n") else text + "\n")
    else:
        click.echo(text)


def _render(report: Report, by: str, fmt: str, output: str | None) -> None:
    """Prints or writes a report: JSON (everything), CSV or Parquet (the ``by`` breakdown), or
    a table (the summary, then the ``by`` breakdown)."""
    if fmt == "json":
        _emit(report.to_json(), output)
    elif fmt == "csv":
        _emit(report.to_csv(by=by), output)  # type: ignore[arg-type]
    elif fmt == "parquet":
        if not output:
            raise click.UsageError("--format parquet needs -o FILE")
        report.to_parquet(output, by=by)  # type: ignore[arg-type]
    else:
        from rlmask._table import format_frame

        parts = [report.summary()]
        if by != "total":
            table = report.by(by)  # type: ignore[arg-type]
            # A sweep's per-tolerance counts make the table too wide to read; files keep them.
            table = table.select(
                c
                for c in table.columns
                if not c.startswith("changed@") and c not in report.table_hidden
            )
            parts += ["", f"by {by}:", format_frame(table)]
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
@_tol_option
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
@_criterion_options
@_by_option(
    "total",
    "Breakdown to print: whole model, per layer, per module type, per tensor, per component "
    "(language model, vision tower, projector), per routed expert of a mixture-of-experts "
    "model (layer and expert), or per binade of the base value (magnitude: the precision lens, "
    "computed in the same pass; the JSON report then carries by_magnitude, and --plot draws "
    "the lens).",
    (*LEVELS, "component", "expert", "magnitude"),
)
@_format_option(["table", "json", "csv", "parquet"])
@_output_option
@_pairing_options
@_shared_rows_option
@_block_option
@click.option(
    "--save-mask",
    type=FILE,
    help="Also write the changed elements at --tol (the subnetwork) to this .rlmask file, "
    "from the same pass.",
)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw sparsity per layer and module type (paper Figure 3) to this image file "
    "(PNG, PDF, SVG by extension; needs matplotlib).",
)
@_quiet_option
@_user_errors
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
    plot: str | None,
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
    """
    from rlmask._diff import DEFAULT_SWEEP, diff

    extra = _parse_tolerances(tolerances) + (list(DEFAULT_SWEEP) if sweep else [])
    _check_criterion(criterion, tol, eta, extra)
    _check_outputs(fmt, output, plot)
    report = diff(
        base,
        tuned,
        tol=tol,
        tolerances=extra or None,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        include=include or None,
        exclude=exclude or None,
        name_map=_parse_name_map(name_map),
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
        block_size=_parse_block(block_size),
        save_mask=save_mask,
        magnitude=by == "magnitude",
        progress=not quiet,
    )
    _render(report, by, fmt, output)
    if plot:
        import matplotlib.pyplot as plt

        from rlmask.plot import magnitude_figure, sparsity_by_layer

        draw = magnitude_figure if by == "magnitude" else sparsity_by_layer
        plt.close(draw(report, plot))


@cli.command()
@_user_errors
def demo() -> None:
    """Finding 1 on weights that training produced, told on the bundled checkpoints.

    The checkpoints come from examples/finding1/study.py: a 76k-parameter llama-shaped model
    pretrained on two-digit addition, then RL (TRL's GRPOTrainer, two seeds) and SFT (TRL's
    SFTTrainer) at the same learning rate. Each step prints the command that gives it.
    """
    import polars as pl

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
    click.echo(f"$ rlmask overlap seed1.rlmask seed2.rlmask --base {rel['base']}")
    click.echo(
        f"   o1 = {100 * t['o1']:.1f}%   uniform baseline {100 * t['o1_random']:.1f}%   "
        f"magnitude-matched {100 * t['o1_matched']:.1f}%"
    )

    click.echo("\n3. Why do elements stay unchanged? The magnitude lens: changed share per binade")
    lens = diff(base, trained_path("rl-seed1"), magnitude=True, progress=False).by_magnitude()
    click.echo(f"$ rlmask diff {rel['base']} {rel['rl-seed1']} --by magnitude")
    big = lens.filter(pl.col("numel") >= 100)
    for r in big.iter_rows(named=True):
        share = 1 - r["sparsity"]
        click.echo(
            f"   |a| >= 2^{r['exponent'] - 127:<4} {r['numel']:>7,} elements  "
            f"{100 * share:5.1f}% changed  " + "#" * round(40 * share)
        )

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
        "magnitudes alone predict. Figures and method: examples/finding1/RESULTS.md."
    )


@cli.group()
def mask() -> None:
    """Inspect and combine .rlmask subnetwork masks."""


@mask.command("info")
@click.argument("file")
@click.option(
    "--by",
    type=click.Choice(["module", "layer", "tensor"]),
    default="module",
    show_default=True,
    help="Breakdown to print under the totals.",
)
@_user_errors
def mask_info(file: str, by: str) -> None:
    """Provenance, totals and a per-module summary of a mask FILE."""
    from rlmask._mask import load_mask
    from rlmask._table import format_frame

    m = load_mask(file)
    table = {"module": m.by_module, "layer": m.by_layer, "tensor": m.table}[by]()
    click.echo(f"{file}\n{m.summary()}\n\nby {by}:\n{format_frame(table)}")


@mask.command("combine")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--op",
    type=click.Choice(COMBINE_OPS),
    required=True,
    help="and/or/xor: elementwise over all inputs; minus: in the first and none of the others; "
    "not: complement of one input; consensus: in at least --min-count inputs.",
)
@click.option("--min-count", type=int, help="For --op consensus: inputs an element must be in.")
@click.option(
    "-o",
    "--output",
    type=FILE,
    required=True,
    help="The .rlmask file to write (atomically).",
)
@_user_errors
def mask_combine(inputs: tuple[str, ...], op: str, min_count: int | None, output: str) -> None:
    """Combine mask files INPUTS into a new mask.

    \b
    Examples:
      rlmask mask combine --op and -o shared.rlmask seed1.rlmask seed2.rlmask
      rlmask mask combine --op consensus --min-count 2 -o core.rlmask s1.rlmask s2.rlmask s3.rlmask
    """
    from rlmask._mask import combine, load_mask

    check_output(output)
    out = combine(op, [load_mask(f) for f in inputs], min_count)
    out.save(output)
    click.echo(
        f"wrote {output}: {out.count:,} of {out.numel:,} elements "
        f"(density {100 * out.density:.3f}%)"
    )


@cli.group()
def patch() -> None:
    """Sparse patches: ship a checkpoint's changes losslessly (create, apply, info, verify)."""


@patch.command("create")
@click.argument("base")
@click.argument("tuned")
@click.option(
    "-o",
    "--output",
    type=FILE,
    required=True,
    help="The patch file to write (atomically), conventionally *.rlpatch.",
)
@click.option(
    "--name-map",
    multiple=True,
    metavar="FROM=TO",
    help="Rewrite the name prefix FROM as TO on both sides before pairing (repeatable).",
)
@click.option(
    "--codec",
    type=click.Choice(PATCH_CODECS),
    default=DEFAULT_PATCH_CODEC,
    show_default=True,
    help="plain: int32 flat indices and new values, the form TRL, vLLM and prime-rl load "
    "(6 bytes per changed bf16 element); compact: index gaps as varints and the values' "
    "byte planes under zstd (smaller; every rlmask reader decodes it).",
)
@_quiet_option
@_user_errors
def patch_create(
    base: str, tuned: str, output: str, name_map: tuple[str, ...], codec: str, quiet: bool
) -> None:
    """Write the patch that turns BASE into TUNED, bit for bit.

    Per changed tensor: the flat indices of the elements whose bits differ and TUNED's values
    there (or the whole tensor where that is smaller), with blake3 fingerprints of every tensor
    before and after. One streaming pass; memory stays flat.

    \b
    Examples:
      rlmask patch create step-100/ step-200/ -o 200.rlpatch
      rlmask patch create step-100/ step-200/ -o 200.rlpatch --codec compact
    """
    from rlmask import patch as patches

    info = patches.create(
        base,
        tuned,
        output,
        name_map=_parse_name_map(name_map),
        codec=codec,
        progress=not quiet,
    )
    click.echo(info.summary())


@patch.command("apply")
@click.argument("base")
@click.argument("patch_files", metavar="PATCH...", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=DIRECTORY,
    required=True,
    help="The checkpoint directory to write (must not exist, or be empty).",
)
@_quiet_option
@_user_errors
def patch_apply(base: str, patch_files: tuple[str, ...], output: str, quiet: bool) -> None:
    """Apply PATCH... in order to BASE, writing the result as a new checkpoint directory.

    The output has BASE's sharding, headers, index and other files; every tensor is checked
    against the fingerprints each patch expects before and promises after, so a patch made
    from another base, a corrupt patch, or a chain with a patch missing, repeated or out of
    order fails, naming the tensor. BASE is never modified.

    \b
    Examples:
      rlmask patch apply step-100/ 200.rlpatch 300.rlpatch -o step-300/
    """
    from rlmask import patch as patches

    out = patches.apply(base, list(patch_files), output, progress=not quiet)
    click.echo(f"wrote {out}")


@patch.command("info")
@click.argument("file")
@_by_option("module", "Breakdown to print under the summary.")
@_format_option(["table", "json", "csv"])
@_output_option
@_user_errors
def patch_info(file: str, by: str, fmt: str, output: str | None) -> None:
    """Tensors, changed elements, bytes by kind and fingerprints of a patch FILE."""
    from rlmask import patch as patches

    _check_outputs(fmt, output, None)
    _render(patches.load(file), by, fmt, output)


@patch.command("convert")
@click.argument("src")
@click.option("-o", "--output", type=FILE, required=True, help="The file to write.")
@click.option(
    "--to",
    type=click.Choice(["trl", "rlmask"]),
    required=True,
    help="trl: an rlmask patch to TRL's delta-sync file; rlmask: a TRL file to an rlmask patch.",
)
@click.option(
    "--base",
    help="With --to rlmask: the checkpoint the TRL sync applies to (TRL files carry no shapes "
    "or fingerprints).",
)
@click.option(
    "--encoding",
    type=click.Choice(["raw", "gap_delta"]),
    default="raw",
    show_default=True,
    help="With --to trl: int32 indices, or gaps as uint16 (uint32 where a gap exceeds 65535).",
)
@_user_errors
def patch_convert(src: str, output: str, to: str, base: str | None, encoding: str) -> None:
    """Convert SRC between rlmask patches and TRL's delta-sync files (needs torch).

    \b
    Examples:
      rlmask patch convert 200.rlpatch --to trl --encoding gap_delta -o sync-200.safetensors
      rlmask patch convert sync-200.safetensors --to rlmask --base step-100/ -o 200.rlpatch
    """
    from rlmask import patch as patches

    if to == "rlmask" and base is None:
        raise click.UsageError("--to rlmask needs --base: the checkpoint the TRL file applies to")
    patches.convert(src, output, to=to, base=base, encoding=encoding)
    click.echo(f"wrote {output}")


@patch.command("verify")
@click.argument("base")
@click.argument("file")
@click.argument("tuned", required=False)
@_quiet_option
@_user_errors
def patch_verify(base: str, file: str, tuned: str | None, quiet: bool) -> None:
    """Check that patch FILE applies to BASE and gives what it promises (and TUNED, if given).

    Writes nothing; exit 1 with the tensor at fault when it does not.
    """
    from rlmask import patch as patches

    patches.verify(base, file, tuned, progress=not quiet)
    click.echo(f"ok: {file} applies to {base}" + (f" and gives {tuned}" if tuned else ""))


@cli.command("overlap")
@click.argument("masks", nargs=-1, required=True)
@_by_option(
    "total",
    "Breakdown to print; for three or more masks, one row per ordered pair (and layer, "
    "module or tensor).",
)
@_format_option(["table", "json", "csv", "parquet"])
@_output_option
@click.option(
    "--common-only",
    is_flag=True,
    help="Compare only the tensors all masks share (same name and shape).",
)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw the o1 matrix as a heatmap (paper Table 4) to this image file.",
)
@click.option(
    "--base",
    metavar="CHECKPOINT",
    help="Two masks: the checkpoint they were taken against; adds the magnitude-matched "
    "baseline o1_matched/o2_matched (same density in every binade of the base's values).",
)
@click.option(
    "--name-map",
    multiple=True,
    metavar="FROM=TO",
    help="With --base: rewrite the base's name prefix FROM as TO (repeatable).",
)
@_user_errors
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
    """
    from rlmask._overlap import overlap, overlap_matrix

    if len(masks) < 2:
        raise click.UsageError("overlap needs at least two masks")
    _check_outputs(fmt, output, plot)
    if (base or name_map) and len(masks) != 2:
        raise click.UsageError("--base and --name-map go with two masks")
    if name_map and not base:
        raise click.UsageError("--name-map goes with --base")
    labels = [str(i + 1) for i in range(len(masks))]
    matrix = None
    if len(masks) > 2 or plot:
        matrix = overlap_matrix(list(masks), labels=labels, common_only=common_only)
    if len(masks) == 2:
        pair = overlap(
            masks[0],
            masks[1],
            common_only=common_only,
            base=base,
            name_map=_parse_name_map(name_map),
        )
        _render(pair, by, fmt, output)
    else:
        assert matrix is not None
        _render(matrix, by, fmt, output)
    if plot and matrix is not None:
        import matplotlib.pyplot as plt

        from rlmask.plot import overlap_heatmap

        plt.close(overlap_heatmap(matrix, plot))


@cli.command("trajectory")
@click.argument("base")
@click.argument("checkpoints", nargs=-1, required=True)
@_tol_option
@_criterion_options
@_by_option(
    "total",
    "Breakdown to print: per checkpoint for the whole model, or per layer, "
    "module type or tensor and checkpoint.",
)
@_format_option(["table", "json", "csv", "parquet"])
@_output_option
@_pairing_options
@_block_option
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
@_quiet_option
@_user_errors
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
    from rlmask._trajectory import trajectory

    _check_criterion(criterion, tol, eta, [])
    _check_outputs(fmt, output, plot)
    report = trajectory(
        base,
        list(checkpoints),
        tol=tol,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        include=include or None,
        exclude=exclude or None,
        name_map=_parse_name_map(name_map),
        skip_mismatched=skip_mismatched,
        block_size=_parse_block(block_size),
        save_masks=save_masks,
        progress=not quiet,
        executor=executor,
        segments=segments,
        shared_dir=shared_dir,
        ray_address=ray_address,
    )
    _render(report, by, fmt, output)
    if plot:
        import matplotlib.pyplot as plt

        from rlmask.plot import trajectory_figure

        plt.close(trajectory_figure(report, plot))


@cli.command("survey")
@click.argument("manifest", type=FILE)
@_tol_option
@click.option(
    "--sweep",
    is_flag=True,
    help="Compute the paper's Table 6 sweep (1e-8 ... 1e-5) for every pair, in its one pass.",
)
@click.option("--tolerances", metavar="T1,T2,...", help="More absolute tolerances per pair.")
@_criterion_options
@click.option(
    "--by",
    type=click.Choice(["pair", "group"]),
    default="pair",
    show_default=True,
    help="One row per pair and tolerance, or per group (numel-weighted, mean, min, max).",
)
@_format_option(["table", "json", "csv", "parquet"])
@_output_option
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
    "--plot",
    type=FILE,
    help="Also draw sparsity per pair, coloured by group (paper Figure 1), to this image file.",
)
@_quiet_option
@_user_errors
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
    plot: str | None,
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
    from rlmask._diff import DEFAULT_SWEEP
    from rlmask._survey import survey

    extra = _parse_tolerances(tolerances) + (list(DEFAULT_SWEEP) if sweep else [])
    _check_criterion(criterion, tol, eta, extra)
    _check_outputs(fmt, output, plot)
    if no_cache and cache:
        raise click.UsageError("--cache and --no-cache exclude each other")

    def note(pair: Any, status: str) -> None:
        if not quiet:
            click.echo(f"  {pair.name}: {status}", err=True)

    report = survey(
        manifest,
        tol=tol,
        tolerances=extra or None,
        criterion=criterion,  # type: ignore[arg-type]
        eta=eta,
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
        cache="" if no_cache else cache,
        on_result=note,
    )
    _render(report, by, fmt, output)
    if plot:
        import matplotlib.pyplot as plt

        from rlmask.plot import survey_figure

        plt.close(survey_figure(report, plot))
    if report.failed:
        click.echo(
            f"rlmask: {len(report.failed)} pairs failed: {', '.join(report.failed)}", err=True
        )
        raise click.exceptions.Exit(1)


@cli.command("rank")
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
@_select_options
@_skip_option
@_shared_rows_option
@_by_option("module", "Breakdown to print under the summary.")
@_format_option(["table", "json", "csv"])
@_output_option
@click.option(
    "--plot",
    type=FILE,
    help="Also draw the mean rank fraction per module and every matrix's singular-value "
    "energy curve to this image file.",
)
@_quiet_option
@_user_errors
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
    matrix at a time (batches of same-shaped matrices on CUDA).

    \b
    Examples:
      rlmask rank base/ tuned/
      rlmask rank base/ tuned/ --device cuda --by layer --format csv -o ranks.csv
      rlmask rank base/ tuned/ --plot rank.png
    """
    from rlmask._rank import rank

    _check_outputs(fmt, output, plot)
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
        include=include or None,
        exclude=exclude or None,
        progress=not quiet,
    )
    _render(report, by, fmt, output)
    if plot:
        import matplotlib.pyplot as plt

        from rlmask.plot import rank_figure

        plt.close(rank_figure(report, plot))


def _exit_now(code: list[int]) -> None:
    """Ends the process with the command's exit code, skipping the interpreter's teardown
    (freeing every module, class and function one by one: about 10 ms of a 0.2 s `rlmask diff`).
    Runs as the last exit handler: Python has joined the non-daemon threads and run every other
    handler by then, and the command has closed and renamed its outputs; only the standard
    streams' buffers are left, flushed here. When the command did not end with an exit code (an
    uncaught exception) or flushing fails, the ordinary exit runs and reports it."""
    if not code:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code[0])


def main() -> None:
    """Entry point of the ``rlmask`` command: runs it and ends the process with its exit code.
    (Inside another program, run a command with ``cli.main(args, standalone_mode=False)``.)"""
    # What the imports made so far (click's and this module's classes, functions and tables)
    # lives until exit: the cyclic collector no longer walks it in each collection (7% of the
    # instructions of a `rlmask diff --format json` on a small pair). The console script turns
    # the collector off while it imports this module (`rlmask.__main__`); on again here.
    gc.freeze()
    gc.enable()
    if hasattr(signal, "SIGPIPE"):  # `rlmask ... | head` ends quietly, as other tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # SIGTERM unwinds like Ctrl-C (exit 143), so no temporary file outlives a killed run.
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Registered before the command runs, so that it runs after every exit handler registered
    # by what the command imports (the last registered runs first).
    code: list[int] = []
    atexit.register(_exit_now, code)
    try:
        cli.main(prog_name="rlmask")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code.append(e.code or 0)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
