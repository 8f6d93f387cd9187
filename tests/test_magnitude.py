"""The magnitude lens (design §8): changed and numel per binade of the base value, from the same
pass, against a numpy oracle on byte-written checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import rlmask
from oracle import binade, changed, write_raw
from rlmask.cli import cli

TOLS = [1e-8, 1e-5, 1e-3]


def _pair(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[str, np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(5)
    tensors = {}
    # bf16 across chunk boundaries, with zeros, subnormals, infinities and NaN.
    n = 300_003
    w = (rng.standard_normal(n) * 2.0 ** rng.integers(-20, 4, n)).astype(np.float32)
    w[:50] = 0
    w[50:60] = np.float32(1e-40)
    w[60:62] = np.inf
    w[62:64] = np.nan
    a = (w.view(np.uint32) >> 16).astype(np.uint16)
    b = a.copy()
    moved = rng.random(n) < 0.3
    b[moved] += rng.integers(1, 4, moved.sum()).astype(np.uint16)
    tensors["model.layers.0.mlp.up_proj.weight"] = ("BF16", a, b)
    x = (rng.standard_normal(1001) * 1e-3).astype(np.float32)
    y = x + (rng.standard_normal(1001) * 1e-5).astype(np.float32)
    tensors["model.layers.1.self_attn.q_proj.weight"] = (
        "F32",
        x.view(np.uint32),
        y.view(np.uint32),
    )
    h = rng.standard_normal(77).astype(np.float16)
    tensors["model.norm.weight"] = (
        "F16",
        h.view(np.uint16),
        (h * np.float16(1.01)).view(np.uint16),
    )
    d = np.array([0.0, 1e-300, 5e-39, 1.0, 1e39, np.inf, -2.5, 3e-8], dtype=np.float64)
    tensors["lm_head.weight"] = ("F64", d.view(np.uint64), (d + 1e-6).view(np.uint64))
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_raw(pa, [(k, dt, [x.size], x.tobytes()) for k, (dt, x, _) in tensors.items()])
    write_raw(pb, [(k, dt, [y.size], y.tobytes()) for k, (dt, _, y) in tensors.items()])
    return pa, pb, tensors


def _oracle(tensors: dict) -> dict[tuple[str, int], list[int]]:
    """(name, exponent) -> [numel, changed per tolerance]."""
    out = {}
    for name, (dt, a, b) in tensors.items():
        e = binade(dt, a)
        flags = [changed(dt, a, dt, b, tol=t) for t in TOLS]
        for ex in np.unique(e):
            sel = e == ex
            out[(name, int(ex))] = [int(sel.sum())] + [int(f[sel].sum()) for f in flags]
    return out


def test_bins_match_the_oracle_and_sum_to_the_totals(tmp_path: Path) -> None:
    pa, pb, tensors = _pair(tmp_path)
    report = rlmask.diff(pa, pb, tol=1e-5, tolerances=TOLS, magnitude=True, progress=False)
    want = _oracle(tensors)
    got = {
        (r["name"], r["exponent"]): [r["numel"]] + [r[f"changed@{t:g}"] for t in TOLS]
        for r in report.magnitude.iter_rows(named=True)  # type: ignore[union-attr]
    }
    assert got == want
    lens = report.by_magnitude()
    assert int(lens["numel"].sum()) == report.numel
    for t, c in zip(TOLS, report.changed_per_threshold(), strict=True):
        assert int(lens[f"changed@{t:g}"].sum()) == c
    assert {0, 255} <= set(lens["exponent"])  # zeros/subnormals and inf/NaN have their bins
    row = lens.filter(pl.col("exponent") == 130).row(0, named=True)
    assert row["abs_min"] == 8.0
    # The same counts without the lens, and the lens's JSON.
    plain = rlmask.diff(pa, pb, tol=1e-5, tolerances=TOLS, progress=False)
    assert plain.changed_per_threshold() == report.changed_per_threshold()
    d = report.to_dict()
    assert [b["numel"] for b in d["by_magnitude"]] == lens["numel"].to_list()
    assert "by_magnitude" not in plain.to_dict()
    with pytest.raises(ValueError, match="magnitude=True"):
        plain.by_magnitude()


def test_cli_and_figure(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from rlmask.plot import magnitude_figure

    pa, pb, _ = _pair(tmp_path)
    r = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--by", "magnitude", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    bins = json.loads(r.stdout)["by_magnitude"]
    assert sum(b["numel"] for b in bins) == json.loads(r.stdout)["numel"]
    png = tmp_path / "lens.png"
    r = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--by", "magnitude", "--plot", str(png)])
    assert r.exit_code == 0 and png.stat().st_size > 0, r.stderr
    # The table reads at once: one line per binade, its floor as a power of two, the count and
    # the share changed (from the JSON's counts, which the oracle tests above check).
    lines = r.stdout.splitlines()
    for b in bins:
        if 0 < b["exponent"] < 255:
            share = 100 * b["changed"][0] / b["numel"]
            (line,) = [
                x for x in lines if x.split()[:3] == ["|a|", ">=", f"2^{b['exponent'] - 127}"]
            ]
            assert f"{b['numel']:,} elements" in line and f"{share:5.1f}% changed" in line
    report = rlmask.diff(pa, pb, magnitude=True, progress=False)
    fig = magnitude_figure(report)
    ax = fig.axes[0]
    lens = report.by_magnitude().filter((pl.col("exponent") > 0) & (pl.col("exponent") < 255))
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx((100 * lens["changed"] / lens["numel"]).to_list())
    assert [p.get_x() + p.get_width() / 2 for p in ax.patches] == pytest.approx(
        (lens["exponent"] - 127).to_list()
    )


def test_magnitude_matched_overlap_baseline(tmp_path: Path) -> None:
    pa, _, tensors = _pair(tmp_path)
    rng = np.random.default_rng(8)
    # Two masks whose density depends on the magnitude of the base value, as bf16 rounding
    # makes it: the matched baseline must see that, the uniform one cannot.
    masks = []
    for _ in range(2):
        arrays = {}
        for name, (dt, a, _) in tensors.items():
            e = binade(dt, a)
            p = np.clip((140 - e) / 60, 0.02, 0.9)
            arrays[name] = rng.random(a.size) < p
        masks.append(arrays)
    paths = []
    for i, arrays in enumerate(masks):
        paths.append(tmp_path / f"m{i}.rlmask")
        rlmask.Mask.from_dict(arrays).save(paths[-1])
    r = rlmask.overlap(paths[0], paths[1], base=pa)
    expected = {}
    for name, (dt, a, _) in tensors.items():
        e = binade(dt, a)
        x, y = masks[0][name], masks[1][name]
        expected[name] = sum(
            x[e == b].sum() * y[e == b].sum() / (e == b).sum() for b in np.unique(e)
        )
    size_1 = sum(int(m.sum()) for m in masks[0].values())
    size_2 = sum(int(m.sum()) for m in masks[1].values())
    assert r.total["o1_matched"] == pytest.approx(sum(expected.values()) / size_1, rel=1e-12)
    assert r.total["o2_matched"] == pytest.approx(sum(expected.values()) / size_2, rel=1e-12)
    per = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    for name, want in expected.items():
        assert per[name]["expected_matched"] == pytest.approx(want, rel=1e-12)
    assert r.total["o1_matched"] > r.total["o1_random"] * 1.05  # magnitude explains overlap
    assert "magnitude-matched" in r.summary() and r.to_dict()["base"] == str(pa)
    assert "o1_matched" in r.by_module().columns
    # CLI: the base must cover the masks' tensors.
    run = CliRunner().invoke
    assert run(cli, ["overlap", str(paths[0]), str(paths[1]), "--base", str(pa)]).exit_code == 0
    assert run(cli, ["overlap", *map(str, paths), "--name-map", "a=b"]).exit_code == 2
    other = tmp_path / "other.safetensors"
    write_raw(other, [("w", "F32", [4], bytes(16))])
    res = run(cli, ["overlap", *map(str, paths), "--base", str(other)])
    assert res.exit_code == 1 and "the base has no tensor" in res.stderr
