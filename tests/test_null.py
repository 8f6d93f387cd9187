"""The precision null and the displacement (design §9), against a brute-force oracle: every
placement of every update at every element, rounded by torch, judged by the oracle's criterion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from oracle import changed
from rlmask.cli import cli

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (12, 20),
    "model.layers.0.mlp.up_proj.weight": (16, 15),
    "model.norm.weight": (40,),
}


def _run(tmp_path: Path, seed: int, scale: float = 3e-3) -> tuple[Path, Path, Path, dict]:
    """A base in bf16, a master (base + an accumulated fp32 update, zero for some elements),
    and the tuned checkpoint the run saves (the master rounded to bf16)."""
    g = torch.Generator().manual_seed(seed)
    base, master, tuned = {}, {}, {}
    for name, shape in SHAPES.items():
        b = (torch.randn(shape, generator=g) * 0.05).bfloat16()
        b.view(-1)[:3] = torch.tensor([0.0, 1.5, -2.0]).bfloat16()  # zero and coarse binades
        u = torch.randn(shape, generator=g) * scale * torch.rand(shape, generator=g)
        u.view(-1)[5:9] = 0.0
        m = b.float() + u
        base[name], master[name], tuned[name] = b, m, m.bfloat16()
    paths = []
    for side, tensors in (("base", base), ("master", master), ("tuned", tuned)):
        (tmp_path / side).mkdir(parents=True)
        save_file(tensors, tmp_path / side / "model.safetensors")
        paths.append(tmp_path / side)
    return paths[0], paths[1], paths[2], {n: (base[n], master[n]) for n in SHAPES}


def _bits16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def _brute(
    b: torch.Tensor, m: torch.Tensor, tol: float | None, u: torch.Tensor | None = None
) -> tuple[float, dict[int, float]]:
    """Expected changed elements when each element takes every update in turn (``u``, by
    default ``m - b``), and per binade of the base value."""
    bv = b.double().reshape(-1)
    if u is None:
        u = (m.double() - b.double()).reshape(-1)
    # Every element against every update: round to f32, then to bf16 (torch, to nearest even).
    r = (bv[:, None] + u[None, :]).float().bfloat16()
    a_bits = np.repeat(_bits16(b)[:, None], u.numel(), axis=1).reshape(-1)
    kw = {"criterion": "exact"} if tol is None else {"tol": tol}
    ch = changed("BF16", a_bits, "BF16", _bits16(r), **kw).reshape(bv.numel(), u.numel())
    per_elem = ch.mean(axis=1)
    binade = (b.float().abs().numpy().reshape(-1).view(np.uint32) >> 23) & 0xFF
    bins: dict[int, float] = {}
    for e, x in zip(binade.tolist(), per_elem.tolist(), strict=True):
        bins[e] = bins.get(e, 0.0) + x
    return float(per_elem.sum()), bins


@pytest.mark.parametrize("tol", [1e-5, 1e-3, None])
def test_the_null_against_brute_force(tmp_path: Path, tol: float | None) -> None:
    base, master, tuned, truth = _run(tmp_path, seed=1)
    kw = {"criterion": "exact"} if tol is None else {"tol": tol}
    r = rlmask.diff(base, tuned, null=True, master=master, progress=False, **kw)
    assert r.null is not None
    want_bins: dict[int, float] = {}
    for name, (b, m) in truth.items():
        want, bins = _brute(b, m, tol)
        assert r.null.predicted[name] == pytest.approx(want, rel=1e-12, abs=1e-9), name
        for e, x in bins.items():
            want_bins[e] = want_bins.get(e, 0.0) + x
    # Per binade of the base value, beside the observed counts of the same bins.
    lens = r.by_magnitude()
    got = dict(zip(lens["exponent"].to_list(), lens["predicted_changed"].to_list(), strict=True))
    assert got.keys() == want_bins.keys()
    for e, x in want_bins.items():
        assert got[e] == pytest.approx(x, rel=1e-12, abs=1e-9)
    # The tuned checkpoint is the master rounded: no disagreement; totals and the columns.
    s = r.null_summary()
    assert s is not None and s["master_disagree"] == 0 and s["method"] == "master"
    assert s["numel"] == r.numel
    assert s["predicted_sparsity"] == pytest.approx(1 - sum(want_bins.values()) / r.numel)
    assert s["observed_sparsity"] == pytest.approx(r.sparsity)
    mod = r.by_module()
    assert mod["predicted_changed"].sum() == pytest.approx(sum(want_bins.values()))
    assert "predicted_sparsity" in r.tensors.columns
    # The lens figure draws the null's share per binade beside the observed bars.
    fig = r.plot(kind="magnitude")
    ax = fig.axes[0]
    normal = lens.filter((lens["exponent"] > 0) & (lens["exponent"] < 255))
    (ticks,) = [c for c in ax.collections if c.get_label() == "precision null"]
    want = 100 * (1 - normal["predicted_sparsity"]).to_numpy()
    np.testing.assert_allclose(ticks.get_offsets()[:, 1], want)


def test_a_wrong_master_is_flagged_and_bad_ones_refused(tmp_path: Path) -> None:
    base, master, tuned, _ = _run(tmp_path / "a", seed=2)
    _, other, _, _ = _run(tmp_path / "b", seed=3)
    r = rlmask.diff(base, tuned, null=True, master=other, progress=False)
    s = r.null_summary()
    assert s is not None and s["master_disagree"] > 0
    assert "is it TUNED's own master copy?" in r.summary()
    with pytest.raises(ValueError, match="absolute and exact"):
        rlmask.diff(base, tuned, null=True, master=master, criterion="relative", eta=0.01)
    # A master of other shapes, or missing a tensor.
    (tmp_path / "bad").mkdir()
    save_file({n: torch.zeros(3) for n in SHAPES}, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(
        rlmask.TensorMismatchError, match=r"fp32 weights \(F32 or F64\) of the base's shapes"
    ):
        rlmask.diff(base, tuned, null=True, master=tmp_path / "bad", progress=False)
    # The master is an input: no output may overwrite it.
    shard = master / "model.safetensors"
    res = CliRunner().invoke(
        cli, ["diff", str(base), str(tuned), "--master", str(master), "-o", str(shard)]
    )
    assert res.exit_code == 2, res.output


def test_displacement_quantiles_against_numpy(tmp_path: Path) -> None:
    base, master, tuned, truth = _run(tmp_path, seed=4)
    r = rlmask.diff(base, tuned, master=master, progress=False)
    d = r.displacement
    assert d is not None and d.source == "master"
    u = np.concatenate([(m.double() - b.double()).abs().numpy().ravel() for b, m in truth.values()])
    assert d.numel == u.size and d.mean == pytest.approx(u.mean())
    assert d.max == pytest.approx(u.max())
    for q in (0.5, 0.9, 0.99):
        exact = np.quantile(u.astype(np.float32), q, method="inverted_cdf")
        assert exact * (1 - 2**-7) <= d.quantile(q) <= exact, q
    # Without a master: |tuned - base|, mostly zeros at this update size.
    t = rlmask.diff(base, tuned, displacement=True, progress=False)
    assert t.displacement is not None and t.displacement.source == "tuned"
    moved = np.concatenate(
        [(m.bfloat16().double() - b.double()).abs().numpy().reshape(-1) for b, m in truth.values()]
    )
    assert t.displacement.to_dict()["zero_share"] == pytest.approx(np.mean(moved == 0))
    assert t.displacement.mean == pytest.approx(moved.mean())
    # In the JSON report and the CLI's summary.
    res = CliRunner().invoke(
        cli,
        ["diff", str(base), str(tuned), "--null", "--master", str(master), "--format", "json"],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["null"]["method"] == "master" and doc["displacement"]["source"] == "master"
    assert all("predicted_changed" in t for t in doc["tensors"])
    assert all("predicted_changed" in b for b in doc["by_magnitude"])
    args = ["diff", str(base), str(tuned), "--null", "--master", str(master)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "precision null" in res.stdout and "displacement" in res.stdout


@pytest.mark.parametrize("tol", [1e-5, None])
def test_the_fit_without_a_master(tmp_path: Path, tol: float | None) -> None:
    """Without the master, the moves of each tensor's quarter of elements nearest zero stand
    in for its updates: the same brute force over every placement of those moves."""
    base, _, tuned, truth = _run(tmp_path, seed=5)
    kw = {"criterion": "exact"} if tol is None else {"tol": tol}
    r = rlmask.diff(base, tuned, null=True, progress=False, **kw)
    s = r.null_summary()
    assert r.null is not None and s is not None and s["method"] == "fit"
    for name, (b, m) in truth.items():
        flat = b.double().reshape(-1)
        moved = m.bfloat16().double().reshape(-1) - flat
        k = max(1, int(0.25 * flat.numel()))
        order = sorted(range(flat.numel()), key=lambda i: (abs(float(flat[i])), i))[:k]
        want, _ = _brute(b, m, tol, u=moved[order])
        assert r.null.predicted[name] == pytest.approx(want, rel=1e-12, abs=1e-9), name
    res = CliRunner().invoke(cli, ["diff", str(base), str(tuned), "--null"])
    assert res.exit_code == 0 and "fitted from the checkpoints" in res.stdout
