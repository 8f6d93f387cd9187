"""The extension module's runtime values against its hand-written stub: `mypy.stubtest`
checks signatures but not what calls return, so this test reads the return and property
annotations out of `_rlmask.pyi` (parsed with `ast`, an independent source) and checks every
value that the main calls produce against them, element by element."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlmask import _rlmask

STUB = ast.parse(Path(_rlmask.__file__).with_name("_rlmask.pyi").read_text())
CLASSES = {n.name: n for n in STUB.body if isinstance(n, ast.ClassDef)}
FUNCTIONS = {n.name: n for n in STUB.body if isinstance(n, ast.FunctionDef)}
SCALARS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "Path": Path,
    "PathLike": os.PathLike,
    "bytes": bytes,
}


def conforms(value: Any, ann: ast.expr) -> bool:
    """Whether `value` is of the stub type `ann` (the subset of typing the stub uses)."""
    if isinstance(ann, ast.Constant) and ann.value is None:
        return value is None
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        return conforms(value, ann.left) or conforms(value, ann.right)
    if isinstance(ann, ast.Name):
        if ann.id == "Any":
            return True
        if ann.id in CLASSES:
            return type(value) is getattr(_rlmask, ann.id)
        want = SCALARS[ann.id]
        # bool is an int in Python, but an int field must not come back as a bool.
        return isinstance(value, want) and not (want is int and isinstance(value, bool))
    assert isinstance(ann, ast.Subscript), ast.dump(ann)
    outer = ast.unparse(ann.value)
    args = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
    if outer == "npt.NDArray":
        return isinstance(value, np.ndarray) and value.dtype == np.dtype(
            ast.unparse(args[0]).removeprefix("np.")
        )
    if outer == "list":
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if outer == "dict":
        return isinstance(value, dict) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    assert outer == "tuple", outer
    if not isinstance(value, tuple):
        return False
    if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
        return all(conforms(v, args[0]) for v in value)
    if len(args) == 1 and isinstance(args[0], ast.Tuple) and not args[0].elts:
        return value == ()
    return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))


def returns(where: ast.ClassDef | None, name: str) -> ast.expr:
    body = where.body if where is not None else STUB.body
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            assert node.returns is not None
            return node.returns
    raise AssertionError(f"{name} is not in the stub")


def check_call(value: Any, cls: str | None, name: str) -> Any:
    """`value` (what `cls.name(...)` or `name(...)` returned) against the stub."""
    ann = returns(CLASSES[cls] if cls else None, name)
    assert conforms(value, ann), f"{cls}.{name} returned {value!r}, stub says {ast.unparse(ann)}"
    return value


def check_properties(obj: Any) -> int:
    """Every property the stub declares on `obj`'s class, read and checked; returns how many."""
    node = CLASSES[type(obj).__name__]
    props = [
        n
        for n in node.body
        if isinstance(n, ast.FunctionDef)
        and any(ast.unparse(d) == "property" for d in n.decorator_list)
    ]
    for p in props:
        value = getattr(obj, p.name)
        assert p.returns is not None
        assert conforms(value, p.returns), (
            f"{type(obj).__name__}.{p.name} is {value!r}, stub says {ast.unparse(p.returns)}"
        )
    return len(props)


def test_the_checker_rejects_what_the_stub_forbids() -> None:
    def ann(text: str) -> ast.expr:
        return ast.parse(text, mode="eval").body

    assert conforms([Path("a")], ann("list[Path]"))
    assert not conforms(["a"], ann("list[Path]"))  # a str where the stub says Path
    assert not conforms(True, ann("int"))
    assert not conforms((1, "a"), ann("tuple[int, int]"))
    assert conforms(None, ann("int | None"))
    assert not conforms(np.zeros(2, np.int8), ann("npt.NDArray[np.uint8]"))
    assert conforms({"a": [1]}, ann("dict[str, list[int]]"))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 16, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(16).bfloat16(),
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g).bfloat16(),
        "steps": torch.arange(4, dtype=torch.int64),
    }
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight"][0, :5] += 1.0
    tuned["model.layers.0.input_layernorm.weight"] += 1.0  # a patch stores it whole
    (tmp_path / "base").mkdir()
    (tmp_path / "tuned").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    save_file(tuned, tmp_path / "tuned" / "model.safetensors")
    return tmp_path / "base", tmp_path / "tuned"


def test_main_calls_return_what_the_stub_says(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    a, b = _rlmask.Checkpoint(base), _rlmask.Checkpoint(tuned)
    assert check_properties(a) == 8  # path, shards, location, remote, fetched, config, ...
    assert (a.location, a.remote, a.fetched, a.config) == (str(a.path), False, 0, None)
    assert a.shard_sizes == [os.path.getsize(s) for s in a.shards]
    assert a.shard_etags == [None]
    names = check_call(a.names(), "Checkpoint", "names")
    info = check_call(a.tensor_info(names[0]), "Checkpoint", "tensor_info")
    assert check_properties(info) == 4
    check_call(a.metadata(), "Checkpoint", "metadata")
    raw = check_call(a.raw(names[0]), "Checkpoint", "raw")
    check_call(
        a.binade_counts(names[0], [np.zeros(raw.size, np.uint8)]), "Checkpoint", "binade_counts"
    )

    crit = _rlmask.Criterion("absolute", tol=1e-5, tolerances=[0.0, 1e-3])
    assert check_properties(crit) == 4
    assert check_properties(pickle.loads(pickle.dumps(crit))) == 4
    plan = _rlmask.PlanOptions(name_map=[("x.", "y.")], block_base=(128, 128))
    assert check_properties(plan) == 6
    again = pickle.loads(pickle.dumps(plan))
    assert (again.name_map, again.block_base, again.select) == ([("x.", "y.")], (128, 128), None)
    plan = _rlmask.PlanOptions()
    result = check_call(
        _rlmask.diff(
            a,
            b,
            _rlmask.DiffOptions(crit, plan, mask_at=crit.primary_index, magnitude=True),
        ),
        None,
        "diff",
    )
    assert check_properties(result) == 12
    cols = result.columns
    kinds = {"name": str, "dtype": str, "tuned_dtype": str, "numel": int, "floating": bool}
    assert set(cols) == {*kinds, "shape", "changed"}
    assert len({len(v) for v in cols.values()}) == 1  # one entry per tensor in every column
    for key, kind in kinds.items():
        assert all(type(x) is kind for x in cols[key]), key
    for key in ("shape", "changed"):
        assert all(isinstance(x, list) and all(type(i) is int for i in x) for x in cols[key])
    # Bits only for the floating tensors: both arms of "a mask or not" exercised.
    assert 0 < len(result.bits) < len(cols["name"])
    assert result.magnitude is not None and all(len(row) == 4 for row in result.magnitude)
    # A sampled diff adds one column: (elements, bytes, blocks, total blocks, block, sums of
    # squared block counts per threshold) per tensor.
    sampled = _rlmask.diff(a, b, _rlmask.DiffOptions(crit, plan, sample=(0.5, 1, 64))).columns
    assert set(sampled) == {*kinds, "shape", "changed", "sample"}
    for row in sampled["sample"]:
        *counts, sums = row
        assert len(counts) == 5 and all(type(i) is int for i in counts), row
        assert isinstance(sums, list) and all(type(x) is float for x in sums), row

    mask_path = tmp_path / "m.rlmask"
    traj = check_call(
        _rlmask.trajectory(
            a,
            [b, b],
            _rlmask.TrajectoryOptions(
                _rlmask.Criterion("exact"), plan, mask_files=[mask_path, tmp_path / "n"]
            ),
        ),
        None,
        "trajectory",
    )
    assert check_properties(traj) == 12
    assert check_properties(pickle.loads(pickle.dumps(traj))) == 12

    mask = _rlmask.MaskFile(mask_path)
    assert check_properties(mask) == 1
    tensors = check_call(mask.tensors(), "MaskFile", "tensors")
    assert {check_properties(t) for t in tensors} == {4}
    check_call(mask.metadata(), "MaskFile", "metadata")
    packed = [check_call(mask.packed(t.name), "MaskFile", "packed") for t in tensors]
    numels = [t.numel for t in tensors]
    check_call(_rlmask.mask_count(packed, numels), None, "mask_count")
    check_call(_rlmask.mask_overlap(packed, packed, numels), None, "mask_overlap")
    op = _rlmask.CombineOp("consensus", 2, 1)
    assert check_properties(op) == 2
    combined = _rlmask.mask_combine(op, [[p, p] for p in packed], numels)
    check_call(combined, None, "mask_combine")
    check_call(_rlmask.canonical_name("module.x", [("x", "y")]), None, "canonical_name")
    progress = _rlmask.Progress()
    assert check_properties(progress) == 2

    check_call(_rlmask.fingerprint(raw), None, "fingerprint")
    forms = set()
    for codec in _rlmask.PATCH_CODECS:
        out = tmp_path / f"{codec}.rlpatch"
        entries, size = check_call(
            _rlmask.patch_create(a, b, out, codec=codec), None, "patch_create"
        )
        assert {check_properties(e) for e in entries} == {7}
        assert size == out.stat().st_size
        f = _rlmask.PatchFile(out)
        assert check_properties(f) == 2  # path, codec
        check_call(f.entries(), "PatchFile", "entries")
        check_call(f.metadata(), "PatchFile", "metadata")
        check_call(f.stored_bytes(), "PatchFile", "stored_bytes")
        check_call(f.plain_bytes(), "PatchFile", "plain_bytes")
        for e in entries:
            got = check_call(f.changes(e.name), "PatchFile", "changes")
            forms.add((e.form, got is None, got is not None and got[0] is None))
            if e.form == "sparse":
                n = int(np.prod(e.shape))
                check_call(_rlmask.compact_bytes(got[0], got[1], 2, n), None, "compact_bytes")
    # Every arm of `changes`' union: sparse, dense (no indices), unchanged (None).
    assert forms == {("sparse", False, False), ("dense", False, True), ("none", True, False)}
