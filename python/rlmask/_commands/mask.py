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
    """Inspect, combine and make control .rlmask subnetwork masks."""


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


@mask.command("random")
@click.option("--like", "like", required=True, type=FILE, help="The mask whose counts to keep.")
@click.option(
    "--matched",
    metavar="BASE",
    help="Keep the count per tensor and per binade of BASE's values (the magnitude-matched "
    "control); BASE is the checkpoint the mask was taken against.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--name-map",
    multiple=True,
    metavar="FROM=TO",
    help="With --matched: rewrite BASE's name prefix FROM as TO (repeatable).",
)
@click.option(
    "-o", "--output", type=FILE, required=True, help="The .rlmask file to write (atomically)."
)
@user_errors
def mask_random(
    like: str, matched: str | None, seed: int, name_map: tuple[str, ...], output: str
) -> None:
    """A control mask: the counts of mask --like, at random places.

    Per tensor by default (uniform); with --matched BASE per tensor and binade of the base
    value, so that a control has the same magnitude profile as the subnetwork (Conjecture 1's
    controls, overlap baselines).

    \b
    Examples:
      rlmask mask random --like grpo.rlmask --seed 1 -o uniform.rlmask
      rlmask mask random --like grpo.rlmask --matched base/ --seed 1 -o matched.rlmask
    """
    from rlmask._commands.common import parse_name_map
    from rlmask._mask import Mask, load_mask

    if name_map and not matched:
        raise click.UsageError("--name-map goes with --matched")
    check_outputs("table", output, None, inputs=[like, matched])
    out = Mask.random_like(load_mask(like), matched, seed=seed, name_map=parse_name_map(name_map))
    out.save(output)
    click.echo(
        f"wrote {output}: {out.count:,} of {out.numel:,} elements at random "
        f"({'per tensor and binade' if matched else 'per tensor'}, seed {seed})"
    )


command = mask
