"""Intervals (issue 27): the bootstraps of rlmask.stats checked by what an interval promises
(coverage of a known mean, its width against the normal approximation), and the seed-overlap
excess of overlap_matrix against numpy on the masks' bits and the base's binades."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from rlmask.cli import cli
from rlmask.stats import bootstrap_diff, bootstrap_mean, pair_bootstrap, paired_bootstrap, wilson


def test_bootstrap_mean_width_and_coverage() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 400)
    mean, (lo, hi) = bootstrap_mean(x)
    assert mean == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    # Coverage: the interval holds the true mean about 95% of the time.
    hits = 0
    for k in range(200):
        sample = rng.exponential(1.0, 60)  # skewed, mean 1
        _, (a, b) = bootstrap_mean(sample, resamples=2000, seed=k)
        hits += a <= 1.0 <= b
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_bootstrap_keeps_pairs() -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.random(300)
    a = (rng.random(300) < difficulty).astype(float)  # per-problem rewards, strongly paired
    b = a.copy()
    b[rng.choice(300, 12, replace=False)] = 1.0 - b[rng.choice(300, 12, replace=False)]
    d, (lo, hi) = paired_bootstrap(a, b)
    assert d == pytest.approx((a - b).mean())
    # Pairing removes the shared difficulty: far narrower than two independent intervals.
    _, (la, ha) = bootstrap_mean(a)
    assert hi - lo < (ha - la) / 2
    assert paired_bootstrap(a, a) == (0.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(a, b[:-1])


def test_pair_bootstrap_resamples_runs() -> None:
    assert pair_bootstrap(2, lambda i, j: 0.5) == (0.5, None)
    mean, ci = pair_bootstrap(5, lambda i, j: 0.25)
    assert mean == 0.25 and ci == pytest.approx((0.25, 0.25))
    # Run effects: value(i, j) = r_i + r_j + noise, true mean 0. Resampling runs covers it.
    rng = np.random.default_rng(2)
    hits = 0
    for k in range(100):
        r = rng.normal(0, 1, 8)
        noise = rng.normal(0, 0.1, (8, 8))
        grid = r[:, None] + r[None, :] + noise
        _, ci = pair_bootstrap(8, lambda i, j, g=grid: g[i, j], resamples=1000, seed=k)
        assert ci is not None
        hits += ci[0] <= 0.0 <= ci[1]
    assert hits >= 80


def test_seed_overlap_excess_against_numpy(tmp_path: Path) -> None:
    """Four masks whose density rises as the base value shrinks (as bf16 rounding makes it):
    the mean o1 excess over each baseline across the 12 ordered pairs, from the bits."""
    rng = np.random.default_rng(3)
    shapes = {"model.layers.0.mlp.up_proj.weight": (30, 40), "model.norm.weight": (64,)}
    base = {n: (torch.randn(s) * 0.05).bfloat16() for n, s in shapes.items()}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    binades = {
        n: ((t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16) >> 23) & 0xFF
        for n, t in base.items()
    }
    masks, paths = [], []
    for k in range(4):
        arrays = {
            n: rng.random(e.shape) < np.clip((125 - e) / 8, 0.05, 0.95) for n, e in binades.items()
        }
        masks.append(arrays)
        paths.append(tmp_path / f"seed{k}.rlmask")
        rlmask.Mask.from_dict(arrays).save(paths[-1])
    m = rlmask.overlap_matrix(paths, base=tmp_path / "base")
    numel = sum(int(np.prod(s)) for s in shapes.values())
    want = {"random": [], "matched": []}
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            a, b = masks[i], masks[j]
            size_a = sum(int(x.sum()) for x in a.values())
            size_b = sum(int(x.sum()) for x in b.values())
            inter = sum(int((a[n] & b[n]).sum()) for n in shapes)
            expected = sum(
                a[n][e == v].sum() * b[n][e == v].sum() / (e == v).sum()
                for n, e in binades.items()
                for v in np.unique(e)
            )
            want["random"].append(inter / size_a - size_b / numel)
            want["matched"].append(inter / size_a - expected / size_a)
    for baseline, values in want.items():
        e = m.excess(baseline)
        assert e["mean"] == pytest.approx(np.mean(values), rel=1e-9)
        assert e["pairs"] == 12 and e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    # Magnitude explains most of the overlap here: the matched excess is the smaller.
    assert m.excess("matched")["mean"] < m.excess("random")["mean"]
    assert set(m.to_dict()["excess"]) == {"random", "matched"}
    with pytest.raises(ValueError, match="needs the base"):
        rlmask.overlap_matrix(paths).excess("matched")
    res = CliRunner().invoke(
        cli, ["overlap", *map(str, paths), "--base", str(tmp_path / "base"), "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["excess"]["matched"]["mean"] == pytest.approx(np.mean(want["matched"]))
    res = CliRunner().invoke(cli, ["overlap", *map(str, paths), "--base", str(tmp_path / "base")])
    assert "magnitude-matched baseline, mean of 12 ordered pairs" in res.stdout


def test_wilson_textbook_values() -> None:
    # Wilson score intervals at 95% (Newcombe 1998, Table I).
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bootstrap_diff_coverage() -> None:
    rng = np.random.default_rng(5)
    hits = 0
    for k in range(200):
        a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.5, 2.0, 40)
        d, ci = bootstrap_diff(a, b, resamples=2000, seed=k)
        assert ci is not None and d == pytest.approx(a.mean() - b.mean())
        hits += ci[0] <= 0.5 <= ci[1]
    assert 0.88 <= hits / 200 <= 0.99
    assert bootstrap_diff([1.0], [0.0, 1.0]) == (0.5, None)


def test_no_excess_over_empty_masks(tmp_path: Path) -> None:
    """Masks that changed nothing have no o1: no mean, no interval, valid JSON (no NaN), and
    the summary says so instead of printing a figure."""
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"m{k}.rlmask")
        rlmask.Mask.from_dict({"w": np.zeros(16, bool)}).save(paths[-1])
    m = rlmask.overlap_matrix(paths)
    e = m.excess("random")
    assert e["mean"] is None and e["ci95"] is None and e["pairs"] == 0
    assert "no pair has one" in m.summary()
    json.loads(m.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    res = CliRunner().invoke(cli, ["overlap", *map(str, paths), "--format", "json"])
    assert res.exit_code == 0 and "NaN" not in res.stdout
