"""Masks, overlaps and mask algebra against numpy (unpackbits, logical ops, sums)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

import rlmask
from oracle import changed, load_checkpoint
from rlmask.cli import cli
from rlmask.examples import example_path

SIZES = [0, 1, 7, 8, 63, 64, 65, 1000, 3 * 2**20 + 13]
NAMES = [
    f"model.layers.{i % 3}.mlp.{('up_proj', 'down_proj', 'gate_proj')[i // 3]}.weight"
    for i in range(len(SIZES))
]


def _arrays(seed: int, density: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(n,) if n < 100 else (n // 8, 8) if n % 8 == 0 else (n,) for n in SIZES]
    return {name: rng.random(s) < density for name, s in zip(NAMES, shapes, strict=True)}


def _plain_read(path: Path) -> dict[str, np.ndarray]:
    """Reads a mask with safetensors + numpy only, as the format promises."""
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "rlmask" and meta["bitorder"] == "little"
    info = json.loads(meta["tensors"])
    packed = load_file(str(path))
    out = {}
    for name, d in info.items():
        assert packed[name].dtype == np.uint8 and packed[name].size % 8 == 0
        bits = np.unpackbits(packed[name], bitorder="little", count=d["numel"])
        out[name] = bits.astype(bool).reshape(d["shape"])
    return out


def test_from_dict_save_load_and_plain_read(tmp_path: Path) -> None:
    arrays = _arrays(0, 0.3)
    m = rlmask.Mask.from_dict(arrays, meta={"note": "test"})
    assert m.names == sorted(arrays)
    assert m.numel == sum(a.size for a in arrays.values())
    assert m.count == sum(int(a.sum()) for a in arrays.values())
    assert m.density == pytest.approx(m.count / m.numel)
    assert m.counts() == {n: int(a.sum()) for n, a in arrays.items()}
    path = tmp_path / "m.rlmask"
    m.save(path)
    assert _plain_read(path).keys() == arrays.keys()
    for n, a in _plain_read(path).items():
        np.testing.assert_array_equal(a, arrays[n])
    loaded = rlmask.load_mask(path)
    assert loaded.meta["note"] == "test" and loaded.meta["version"] == "1"
    for n, a in arrays.items():
        np.testing.assert_array_equal(loaded[n], a)
        assert loaded.shape(n) == a.shape
        packed = loaded.packed(n)
        assert packed.dtype == np.uint8 and not packed.flags.writeable and packed.base is not None
        np.testing.assert_array_equal(loaded.to_torch(n).numpy(), a)
    assert loaded.count == m.count
    # File size: at most numel/8 + 8 bytes per tensor, plus the header.
    header = int.from_bytes(path.read_bytes()[:8], "little")
    payload = path.stat().st_size - 8 - header
    assert payload <= sum(a.size / 8 + 8 for a in arrays.values())


def test_from_torch_tensors() -> None:
    t = torch.tensor([[True, False, True], [False, False, True]])
    m = rlmask.Mask.from_dict({"w": t, "v": torch.tensor([0.0, 2.5])})
    np.testing.assert_array_equal(m["w"], t.numpy())
    np.testing.assert_array_equal(m["v"], [False, True])


def test_algebra_against_numpy() -> None:
    a, b, c = (_arrays(s, d) for s, d in ((1, 0.3), (2, 0.5), (3, 0.1)))
    ma, mb, mc = (rlmask.Mask.from_dict(x) for x in (a, b, c))
    cases = {
        "and": (ma & mb, {n: a[n] & b[n] for n in a}),
        "or": (ma | mb, {n: a[n] | b[n] for n in a}),
        "xor": (ma ^ mb, {n: a[n] ^ b[n] for n in a}),
        "minus": (ma - mb, {n: a[n] & ~b[n] for n in a}),
        "not": (~ma, {n: ~a[n] for n in a}),
    }
    for j in (1, 2, 3):
        cases[f"consensus{j}"] = (
            rlmask.consensus([ma, mb, mc], min_count=j),
            {n: (a[n].astype(int) + b[n] + c[n]) >= j for n in a},
        )
    for label, (got, want) in cases.items():
        for n in want:
            np.testing.assert_array_equal(got[n], want[n], err_msg=f"{label} {n}")
        assert got.count == sum(int(w.sum()) for w in want.values()), label
    assert (ma & mb).meta["op"] == "and"
    assert json.loads((ma & mb).meta["inputs"]) == ["from_dict", "from_dict"]
    assert rlmask.consensus([ma, mb, mc], 2).meta["min_count"] == "2"
    with pytest.raises(ValueError, match="min_count"):
        rlmask.consensus([ma, mb], 3)


def _oracle_overlap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> dict:
    numel = sum(a[n].size for n in names)
    i1 = sum(int(a[n].sum()) for n in names)
    i2 = sum(int(b[n].sum()) for n in names)
    inter = sum(int((a[n] & b[n]).sum()) for n in names)
    union = sum(int((a[n] | b[n]).sum()) for n in names)
    div = lambda x, y: x / y if y else None  # noqa: E731
    return {
        "numel": numel,
        "size_1": i1,
        "size_2": i2,
        "intersection": inter,
        "union": union,
        "o1": div(inter, i1),
        "o2": div(inter, i2),
        "jaccard": div(inter, union),
        "o1_random": div(i2, numel),
        "o2_random": div(i1, numel),
    }


def _assert_close(got: dict, want: dict) -> None:
    for k, v in want.items():
        assert got[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, float) else v), k


def test_overlap_every_figure_against_numpy(tmp_path: Path) -> None:
    a, b = _arrays(4, 0.2), _arrays(5, 0.4)
    ma, mb = rlmask.Mask.from_dict(a), rlmask.Mask.from_dict(b)
    ma.save(tmp_path / "a.rlmask")
    r = rlmask.overlap(tmp_path / "a.rlmask", mb)
    _assert_close(r.total, _oracle_overlap(a, b, list(a)))
    for row in r.tensors.iter_rows(named=True):
        _assert_close(row, _oracle_overlap(a, b, [row["name"]]))
    for row in r.by_layer().iter_rows(named=True):
        names = [n for n in a if f".layers.{row['layer']}." in n]
        _assert_close(row, _oracle_overlap(a, b, names))
    for row in r.by_module().iter_rows(named=True):
        names = [n for n in a if f".{row['module']}." in n]
        _assert_close(row, _oracle_overlap(a, b, names))
    empty = r.tensors.filter(r.tensors["name"] == NAMES[0]).row(0, named=True)
    assert empty["numel"] == 0 and empty["o1"] is None and empty["o1_random"] is None
    d = json.loads(r.to_json())
    assert d["o1"] == pytest.approx(r.o1) and len(d["tensors"]) == len(a)


def test_masks_from_real_diffs_match_the_oracle(tmp_path: Path) -> None:
    base, tuned = example_path("base"), example_path("tuned-seed1")
    report = rlmask.diff(base, tuned, tol=1e-6, save_mask=tmp_path / "s1.rlmask", progress=False)
    a = load_checkpoint(sorted(base.glob("*.safetensors")))
    b = load_checkpoint(sorted(tuned.glob("*.safetensors")))
    m = rlmask.load_mask(tmp_path / "s1.rlmask")
    assert m.meta["tolerance"] == "1e-06" and m.meta["criterion"] == "absolute"
    assert m.meta["base"] == str(base)
    for name in m:
        (da, xa), (db, xb) = a[name], b[name]
        want = changed(da, xa, db, xb, tol=1e-6).reshape(m.shape(name))
        np.testing.assert_array_equal(m[name], want, err_msg=name)
        assert m.dtype(name) == "BF16"
    assert m.count == report.changed
    assert report.mask is None  # streamed to the file, not held in memory
    # The same mask kept in memory and saved from there makes the same file, byte for byte.
    kept = rlmask.diff(
        base, tuned, tol=1e-6, mask=True, save_mask=tmp_path / "b.rlmask", progress=False
    )
    assert kept.mask is not None and kept.mask.count == m.count
    kept.mask.save(tmp_path / "c.rlmask")
    streamed = (tmp_path / "s1.rlmask").read_bytes()
    assert streamed == (tmp_path / "b.rlmask").read_bytes() == (tmp_path / "c.rlmask").read_bytes()
    # Two seeds' subnetworks from real diffs.
    r2 = rlmask.diff(base, example_path("tuned-seed2"), tol=1e-6, mask=True, progress=False)
    assert r2.mask is not None
    ov = rlmask.overlap(m, r2.mask)
    both = {n: m[n] for n in m}, {n: r2.mask[n] for n in r2.mask}
    _assert_close(ov.total, _oracle_overlap(*both, m.names))


def test_save_mask_needs_the_bits(tmp_path: Path) -> None:
    r = rlmask.diff(example_path("base"), example_path("tuned-seed1"), progress=False)
    with pytest.raises(ValueError, match="mask=True"):
        r.save_mask(tmp_path / "x.rlmask")


def test_mismatched_masks(tmp_path: Path) -> None:
    a = rlmask.Mask.from_dict({"x": np.ones(4, bool), "y": np.ones(3, bool)})
    b = rlmask.Mask.from_dict({"x": np.ones(5, bool), "z": np.ones(3, bool)})
    with pytest.raises(rlmask.MaskError) as e:
        rlmask.overlap(a, b)
    msg = str(e.value)
    assert (
        "only in mask 1 (y)" in msg
        and "only in mask 2 (z)" in msg
        and "'x' [4] in mask 1, [5] in mask 2" in msg
    )
    with pytest.raises(rlmask.MaskError):
        a & b
    c = rlmask.Mask.from_dict({"x": np.ones(4, bool), "z": np.zeros(3, bool)})
    r = rlmask.overlap(a, c, common_only=True)
    assert r.tensors["name"].to_list() == ["x"] and r.excluded == ["y", "z"]
    assert "excluded" in r.summary()


def test_invalid_mask_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(8, dtype=torch.uint8)}, tmp_path / "plain.safetensors")
    with pytest.raises(rlmask.MaskError, match="not an rlmask mask"):
        rlmask.load_mask(tmp_path / "plain.safetensors")
    meta = {
        "format": "rlmask",
        "version": "1",
        "bitorder": "little",
        "tensors": json.dumps({"w": {"shape": [100], "dtype": "F32", "numel": 100}}),
    }
    save_file({"w": torch.zeros(8, dtype=torch.uint8)}, tmp_path / "short.rlmask", metadata=meta)
    with pytest.raises(rlmask.MaskError, match=r"100 bits pack into U8\[16\]") as e:
        rlmask.load_mask(tmp_path / "short.rlmask")
    assert e.value.path == str(tmp_path / "short.rlmask") and e.value.tensor == "w"
    save_file({"w": torch.zeros(16, dtype=torch.uint8)}, tmp_path / "ok.rlmask", metadata=meta)
    assert rlmask.load_mask(tmp_path / "ok.rlmask").count == 0  # another writer's file reads
    with pytest.raises(rlmask.MaskError, match="No such file"):
        rlmask.load_mask(tmp_path / "missing.rlmask")


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_cli_masks_and_overlaps(tmp_path: Path) -> None:
    base = str(example_path("base"))
    s1, s2 = str(tmp_path / "s1.rlmask"), str(tmp_path / "s2.rlmask")
    for tuned, out in (("tuned-seed1", s1), ("tuned-seed2", s2)):
        code, _, err = _cli("diff", base, str(example_path(tuned)), "--save-mask", out, "-q")
        assert code == 0, err
    m1, m2 = rlmask.load_mask(s1), rlmask.load_mask(s2)

    code, out, _ = _cli("mask", "info", s1)
    assert code == 0 and f"{m1.count:,} in the mask" in out and "q_proj" in out
    assert "tolerance: 1e-05" in out

    code, out, _ = _cli("overlap", s1, s2, "--format", "json")
    assert code == 0
    d = json.loads(out)
    want = _oracle_overlap(dict(m1.items()), dict(m2.items()), m1.names)
    _assert_close(d, want)
    code, out, _ = _cli("overlap", s1, s2, "--by", "module")
    assert code == 0 and f"o1 = {100 * want['o1']:.2f}%" in out and "down_proj" in out

    inter = str(tmp_path / "and.rlmask")
    code, out, _ = _cli("mask", "combine", "--op", "and", "-o", inter, s1, s2)
    assert code == 0 and rlmask.load_mask(inter).count == want["intersection"]
    cons = str(tmp_path / "c.rlmask")
    code, _, _ = _cli(
        "mask", "combine", "--op", "consensus", "--min-count", "2", "-o", cons, s1, s2, inter
    )
    assert code == 0 and rlmask.load_mask(cons).count == want["intersection"]

    code, out, _ = _cli("overlap", s1, s2, inter, "--format", "json")
    assert code == 0
    mats = json.loads(out)
    o1 = {
        (i, lab): v for i, row in enumerate(mats["o1"]) for lab, v in row.items() if lab != "mask"
    }
    assert o1[(0, "2")] == pytest.approx(want["o1"])
    assert o1[(1, "1")] == pytest.approx(want["o2"])
    assert o1[(2, "1")] == pytest.approx(1.0) and o1[(2, "2")] == pytest.approx(1.0)
    lift = {
        (i, lab): v for i, row in enumerate(mats["lift"]) for lab, v in row.items() if lab != "mask"
    }
    assert lift[(0, "2")] == pytest.approx(want["o1"] / want["o1_random"])
    code, out, _ = _cli("overlap", s1, s2, inter)
    assert code == 0 and "Jaccard" in out and "3: " in out

    assert _cli("overlap", s1)[0] == 2
    assert _cli("mask", "combine", "--op", "consensus", "-o", cons, s1, s2)[0] == 2
    assert _cli("mask", "combine", "--op", "not", "-o", cons, s1, s2)[0] == 2
    bad = tmp_path / "bad.rlmask"
    bad.write_bytes(b"junk")
    code, _, err = _cli("overlap", s1, str(bad))
    assert code == 1 and "bad.rlmask" in err


def test_n_way_overlap_long_format_and_heatmap(tmp_path: Path) -> None:
    """Three masks: one row per ordered pair, per module too, equal to the pairwise oracle;
    the heatmap shows the o1 matrix."""
    import matplotlib

    matplotlib.use("Agg")

    rng = np.random.default_rng(11)
    shapes = {
        "model.layers.0.mlp.up_proj.weight": (40, 30),
        "model.layers.1.self_attn.q_proj.weight": (17,),
    }
    arrays = [{n: rng.random(s) < d for n, s in shapes.items()} for d in (0.1, 0.3, 0.5)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"m{i}.rlmask"))
        rlmask.Mask.from_dict(a).save(paths[-1])
    with pytest.raises(TypeError, match="not 3: for three or more, rlmask.overlap_matrix"):
        rlmask.overlap(*paths)
    m = rlmask.overlap_matrix(paths, labels=["a", "b", "c"])
    pairs = m.total_frame()
    assert pairs.height == 6 and set(zip(pairs["a"], pairs["b"], strict=True)) == {
        (x, y) for x in "abc" for y in "abc" if x != y
    }
    names = sorted(shapes)
    for r in pairs.iter_rows(named=True):
        want = _oracle_overlap(arrays["abc".index(r["a"])], arrays["abc".index(r["b"])], names)
        _assert_close({k: r[k] for k in want}, want)
    by_module = m.by_module()
    assert by_module.height == 6 * 2
    r = by_module.filter(
        (pl.col("a") == "c") & (pl.col("b") == "a") & (pl.col("module") == "q_proj")
    )
    q = ["model.layers.1.self_attn.q_proj.weight"]
    _assert_close(
        {k: r.row(0, named=True)[k] for k in ("o1", "jaccard")},
        {
            k: v
            for k, v in _oracle_overlap(arrays[2], arrays[0], q).items()
            if k in ("o1", "jaccard")
        },
    )
    # The CLI honours --by for N masks and writes the long form.
    out = tmp_path / "pairs.csv"
    code, _, err = _cli("overlap", *paths, "--by", "module", "--format", "csv", "-o", str(out))
    assert code == 0, err
    assert pl.read_csv(out).height == 12
    png = tmp_path / "t4.png"
    code, _, err = _cli("overlap", *paths, "--plot", str(png))
    assert code == 0 and png.stat().st_size > 0, err
    fig = m.plot()  # rlmask.plot.overlap_heatmap
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    o1 = m.matrices()["o1"]
    for i in range(3):
        for col in "abc":
            assert grid[i, "abc".index(col)] == pytest.approx(100 * o1[col][i])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert len(ax.texts) == 9


def test_public_algebra_layers_and_packed_masks() -> None:
    rng = np.random.default_rng(4)
    shapes = {
        "model.layers.0.mlp.up_proj.weight": (8, 9),
        "model.layers.1.mlp.up_proj.weight": (5,),
        "lm_head.weight": (3, 3),
    }
    arrays = [{n: rng.random(s) < 0.4 for n, s in shapes.items()} for _ in range(3)]
    masks = [rlmask.Mask.from_dict(a) for a in arrays]
    for op, fn in (("and", np.logical_and), ("or", np.logical_or), ("xor", np.logical_xor)):
        got = rlmask.combine(op, masks[:2])
        for n in shapes:
            assert np.array_equal(got[n], fn(arrays[0][n], arrays[1][n])), (op, n)
    minus = rlmask.combine("minus", masks)
    assert np.array_equal(
        minus["lm_head.weight"],
        arrays[0]["lm_head.weight"] & ~arrays[1]["lm_head.weight"] & ~arrays[2]["lm_head.weight"],
    )
    two = rlmask.combine("consensus", masks, 2)
    votes = sum(a["lm_head.weight"].astype(int) for a in arrays)
    assert np.array_equal(two["lm_head.weight"], votes >= 2)
    for op, ms, k, want in (
        ("nand", masks, None, "unknown operation"),
        ("consensus", masks, None, "min_count"),
        ("and", masks, 2, "goes with consensus"),
        ("not", masks, None, "exactly one"),
        ("or", masks[:1], None, "at least two"),
    ):
        with pytest.raises(ValueError, match=want):
            rlmask.combine(op, ms, k)
    # Per layer, with the same null-safe ratio as per module; layers in natural order.
    by_layer = masks[0].by_layer()
    assert by_layer["layer"].to_list() == [0, 1]
    assert by_layer["count"].to_list() == [
        int(arrays[0][f"model.layers.{i}.mlp.up_proj.weight"].sum()) for i in (0, 1)
    ]
    empty = rlmask.Mask.from_dict({"model.layers.0.w": np.zeros((0,), dtype=bool)})
    assert empty.by_layer()["density"].to_list() == [None]
    # From packed bits, as the core and trackers make them.
    packed = rlmask.Mask.from_packed(
        {n: (s, "BF16", masks[0].packed(n)) for n, s in shapes.items()}
    )
    assert all(np.array_equal(packed[n], arrays[0][n]) for n in shapes)
    with pytest.raises(rlmask.MaskError, match="2 packed bytes for 100 elements"):
        rlmask.Mask.from_packed({"w": ((100,), "BF16", np.zeros(2, dtype=np.uint8))})


def test_two_mask_overlap_figure_against_numpy(tmp_path: Path) -> None:
    """`OverlapReport.plot()`: per module (whole model first), bars of o1, its chance level,
    o2 and its chance level, each at the height the numpy oracle gives."""
    import matplotlib

    matplotlib.use("Agg")
    a, b = _arrays(4, 0.2), _arrays(5, 0.4)
    r = rlmask.overlap(rlmask.Mask.from_dict(a), rlmask.Mask.from_dict(b))
    svg = tmp_path / "o.svg"
    fig = r.plot(svg)
    assert svg.read_bytes().lstrip().startswith(b"<?xml")
    ax = fig.axes[0]
    modules = [t.get_text() for t in ax.get_xticklabels()]
    assert modules == ["model", "gate_proj", "up_proj", "down_proj"]
    groups = {"model": NAMES, **{m: [n for n in NAMES if f".{m}." in n] for m in modules[1:]}}
    bars = dict(zip([c.get_label() for c in ax.containers], ax.containers, strict=True))
    assert list(bars) == ["o1", "o1_random", "o2", "o2_random"]
    for i, m in enumerate(modules):
        want = _oracle_overlap(a, b, groups[m])
        for series, container in bars.items():
            assert container[i].get_height() == pytest.approx(100 * want[series]), (m, series)


def test_diff_report_plots_its_layers_or_its_lens(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    r = rlmask.diff(example_path("base"), example_path("tuned-seed1"), tol=1e-6, progress=False)
    fig = r.plot(tmp_path / "layers.pdf")
    assert (tmp_path / "layers.pdf").read_bytes().startswith(b"%PDF")
    weighted = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "layer (weighted)"]
    by_layer = r.by_layer()
    assert list(weighted[0].get_xdata()) == by_layer["layer"].to_list()
    assert list(weighted[0].get_ydata()) == pytest.approx(
        [100 * s for s in by_layer["sparsity"].to_list()]
    )
    with pytest.raises(ValueError, match="magnitude=True"):
        r.plot(kind="magnitude")
    with pytest.raises(ValueError, match="unknown kind"):
        r.plot(kind="modules")  # type: ignore[arg-type]
    lens = rlmask.diff(
        example_path("base"), example_path("tuned-seed1"), magnitude=True, progress=False
    )
    assert len(lens.plot(kind="magnitude").axes) >= 1
