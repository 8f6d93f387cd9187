"""``rlmask mask``: inspecting and combining saved masks."""

from __future__ import annotations

import click

from rlmask._commands.common import (
    FILE,
    check_outputs,
    emit,
    format_option,
    output_option,
    user_errors,
)
from rlmask._rlmask import COMBINE_OPS


@click.group("mask")
def mask() -> None:
    """Inspect and combine .rlmask subnetwork masks."""


@mask.command("info")
@click.argument("file")
@click.option(
    "--by",
    type=click.Choice(["module", "layer", "tensor"]),
    default="module",
    show_default=True,
    help="Breakdown to print under the totals (and to write as CSV).",
)
@format_option(["table", "json", "csv"])
@output_option
@user_errors
def mask_info(file: str, by: str, fmt: str, output: str | None) -> None:
    """Provenance, totals and a per-module summary of a mask FILE.

    --format json writes the provenance, the totals and every breakdown; csv the --by one.
    """
    import json

    from rlmask._mask import load_mask
    from rlmask._report import flat
    from rlmask._table import format_frame

    check_outputs(fmt, output, None, inputs=[file])
    m = load_mask(file)
    tables = {"module": m.by_module, "layer": m.by_layer, "tensor": m.table}
    if fmt == "json":
        text = json.dumps(
            {
                "path": file,
                "meta": {k: v for k, v in m.meta.items() if k != "tensors"},
                "numel": m.numel,
                "count": m.count,
                "density": m.density,
                **{f"by_{k}": f().to_dicts() for k, f in tables.items()},
            }
        )
    elif fmt == "csv":
        text = flat(tables[by]()).write_csv()
    else:
        text = f"{file}\n{m.summary()}\n\nby {by}:\n{format_frame(tables[by]())}"
    emit(text, output)


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
@user_errors
def mask_combine(inputs: tuple[str, ...], op: str, min_count: int | None, output: str) -> None:
    """Combine mask files INPUTS into a new mask.

    \b
    Examples:
      rlmask mask combine --op and -o shared.rlmask seed1.rlmask seed2.rlmask
      rlmask mask combine --op consensus --min-count 2 -o core.rlmask s1.rlmask s2.rlmask s3.rlmask
    """
    from rlmask._mask import combine, load_mask

    check_outputs("table", output, None, inputs=inputs)
    out = combine(op, [load_mask(f) for f in inputs], min_count)
    out.save(output)
    click.echo(
        f"wrote {output}: {out.count:,} of {out.numel:,} elements "
        f"(density {100 * out.density:.3f}%)"
    )


command = mask
