"""``rlmask patch``: sparse patches: create, apply, inspect, convert, verify."""

from __future__ import annotations

import click

from rlmask._commands.common import (
    DIRECTORY,
    FILE,
    by_option,
    check_outputs,
    format_option,
    output_option,
    parse_name_map,
    quiet_option,
    render,
    user_errors,
)
from rlmask._rlmask import DEFAULT_PATCH_CODEC, PATCH_CODECS


@click.group("patch")
def patch() -> None:
    """Sparse patches: ship a checkpoint's changes losslessly (create, apply, info, verify,
    convert)."""


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
@quiet_option
@user_errors
def patch_create(
    base: str, tuned: str, output: str, name_map: tuple[str, ...], codec: str, quiet: bool
) -> None:
    """Write the patch that turns BASE into TUNED, bit for bit.

    Per changed tensor: the flat indices of the elements whose bits differ and TUNED's values
    there (or the whole tensor where that is smaller), with fingerprints of every tensor
    before and after. One streaming pass; memory stays bounded.

    \b
    Examples:
      rlmask patch create step-100/ step-200/ -o 200.rlpatch
      rlmask patch create step-100/ step-200/ -o 200.rlpatch --codec compact
    """
    from rlmask import patch as patches

    check_outputs("table", None, None, inputs=[base, tuned], others=[output])
    info = patches.create(
        base,
        tuned,
        output,
        name_map=parse_name_map(name_map),
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
    help="The checkpoint directory to write (must not exist, or be empty).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Update BASE's directory where it lies instead, rewriting only the pieces a patch "
    "changes, with an undo journal (crash-safe; see `rlmask patch recover`).",
)
@quiet_option
@user_errors
def patch_apply(
    base: str, patch_files: tuple[str, ...], output: str | None, in_place: bool, quiet: bool
) -> None:
    """Apply PATCH... in order to BASE, writing the result as a new checkpoint directory
    (-o), or updating BASE's directory in place (--in-place).

    The output has BASE's sharding, headers, index and other files; every tensor is checked
    against the fingerprints each patch expects before and promises after, so a patch made
    from another base, a corrupt patch, or a chain with a patch missing, repeated or out of
    order fails, naming the tensor, before anything is written. Without --in-place BASE is
    never modified. With it, the old bytes of every changed element are journaled (synced)
    before the first shard byte is written: a crash leaves the journal, and `rlmask patch
    recover BASE` restores the old weights (every other command refuses the directory until
    then).

    \b
    Examples:
      rlmask patch apply step-100/ 200.rlpatch 300.rlpatch -o step-300/
      rlmask patch apply serving/ 200.rlpatch --in-place
    """
    from rlmask import patch as patches

    if in_place == (output is not None):
        raise click.UsageError("give either -o/--output DIR or --in-place")
    if in_place:
        patches.apply_in_place(base, list(patch_files), progress=not quiet)
        click.echo(f"updated {base} in place")
        return
    assert output is not None
    check_outputs("table", None, None, inputs=[base, *patch_files], others=[output])
    out = patches.apply(base, list(patch_files), output, progress=not quiet)
    click.echo(f"wrote {out}")


@patch.command("recover")
@click.argument("checkpoint")
@user_errors
def patch_recover(checkpoint: str) -> None:
    """Undo an interrupted `patch apply --in-place` of CHECKPOINT: write back the old bytes its
    journal holds, check every restored tensor's fingerprint, remove the journal.

    \b
    Examples:
      rlmask patch recover serving/
    """
    from rlmask import patch as patches

    n = patches.recover(checkpoint)
    click.echo(
        f"restored {n} tensors of {checkpoint}" if n else f"{checkpoint}: nothing to recover"
    )


@patch.command("info")
@click.argument("file")
@by_option("module", "Breakdown to print under the summary.")
@format_option(["table", "json", "csv"])
@output_option
@user_errors
def patch_info(file: str, by: str, fmt: str, output: str | None) -> None:
    """Tensors, changed elements, bytes by kind and fingerprints of a patch FILE."""
    from rlmask import patch as patches

    check_outputs(fmt, output, None, inputs=[file])
    render(patches.load(file), by, fmt, output)


@patch.command("convert")
@click.argument("src")
@click.option("-o", "--output", type=FILE, required=True, help="The file to write.")
@click.option(
    "--to",
    type=click.Choice(["trl", "vllm", "rlmask"]),
    required=True,
    help="trl: an rlmask patch to TRL's delta-sync file; vllm: to vLLM's checkpoint patches "
    "(CheckpointWeightPatch fields); rlmask: a TRL or vLLM file to an rlmask patch.",
)
@click.option(
    "--base",
    help="With --to rlmask: the checkpoint the TRL or vLLM file applies to (they carry no "
    "fingerprints; TRL files no shapes either).",
)
@click.option(
    "--encoding",
    type=click.Choice(["raw", "gap_delta"]),
    default="raw",
    show_default=True,
    help="With --to trl: int32 indices, or gaps as uint16 (uint32 where a gap exceeds 65535).",
)
@user_errors
def patch_convert(src: str, output: str, to: str, base: str | None, encoding: str) -> None:
    """Convert SRC between rlmask patches, TRL's delta-sync files and vLLM's checkpoint
    patches (needs torch).

    \b
    Examples:
      rlmask patch convert 200.rlpatch --to trl --encoding gap_delta -o sync-200.safetensors
      rlmask patch convert 200.rlpatch --to vllm -o vllm-200.safetensors
      rlmask patch convert sync-200.safetensors --to rlmask --base step-100/ -o 200.rlpatch
    """
    from rlmask import patch as patches

    if to == "rlmask" and base is None:
        raise click.UsageError("--to rlmask needs --base: the checkpoint the file applies to")
    check_outputs("table", None, None, inputs=[src, base], others=[output])
    patches.convert(src, output, to=to, base=base, encoding=encoding)
    click.echo(f"wrote {output}")


@patch.command("verify")
@click.argument("base")
@click.argument("file")
@click.argument("tuned", required=False)
@quiet_option
@user_errors
def patch_verify(base: str, file: str, tuned: str | None, quiet: bool) -> None:
    """Check that patch FILE applies to BASE and gives what it promises (and TUNED, if given).

    Writes nothing; exit 1 with the tensor at fault when it does not.
    """
    from rlmask import patch as patches

    patches.verify(base, file, tuned, progress=not quiet)
    click.echo(f"ok: {file} applies to {base}" + (f" and gives {tuned}" if tuned else ""))


command = patch
