"""The geometry of an update (issue 29) against an independent numpy oracle, on float32
checkpoints of matrices with known structure: a planted rank-1 update, an update confined to
the base's top subspace, a rescaled spectrum, a rotation, no update at all, a 1 x n matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from rlmask.cli import cli

RATIOS = (0.01, 0.05, 0.1, 0.2)


def oracle(w: np.ndarray, wt: np.ndarray) -> dict:
    """Every measure from the definitions (design §13), in numpy float64."""
    d = (wt.astype(np.float32) - w.astype(np.float32)).astype(np.float64)
    w64, wt64 = w.astype(np.float64), wt.astype(np.float64)
    m, n = d.shape
    min_dim = min(m, n)
    dsq, wsq = float((d**2).sum()), float((w64**2).sum())

    def share(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    s_d = np.linalg.svd(d, compute_uv=False)
    out: dict = {
        "delta_fro": math.sqrt(dsq),
        "base_fro": math.sqrt(wsq),
        "relative_fro": share(math.sqrt(dsq), math.sqrt(wsq)),
        "spectral_norm": float(s_d[0]),
        "stable_rank": share(dsq, float(s_d[0]) ** 2),
        "energy_top_k": {str(k): share(float((s_d[:k] ** 2).sum()), dsq) for k in (1, 2, 4, 8)},
    }
    u, s, vh = np.linalg.svd(w64, full_matrices=False)
    ut, st, _ = np.linalg.svd(wt64, full_matrices=False)
    out["spectral_drift"] = share(float(np.linalg.norm(st - s)), float(np.linalg.norm(s)))
    for key in ("principal_energy", "left_principal_energy", "right_principal_energy", "rotation"):
        out[key] = {}

    def rank(v: np.ndarray) -> int:
        return 0 if v[0] == 0 else int((v > v[0] * max(m, n) * np.finfo(np.float64).eps).sum())

    for r in RATIOS:
        k = min(max(1, math.floor(r * min_dim)), rank(s))
        out.setdefault("principal_energy_uniform", {})[str(r)] = (k / m) * (k / n)
        if k == 0:
            for key in ("principal_energy", "left_principal_energy", "right_principal_energy"):
                out[key][str(r)] = None
            out["rotation"][str(r)] = None
            continue
        uk, vk = u[:, :k], vh[:k].T
        out["principal_energy"][str(r)] = share(float(((uk.T @ d @ vk) ** 2).sum()), dsq)
        out["left_principal_energy"][str(r)] = share(float(((uk.T @ d) ** 2).sum()), dsq)
        out["right_principal_energy"][str(r)] = share(float(((d @ vk) ** 2).sum()), dsq)
        kt = min(k, rank(st))
        cos = np.clip(np.linalg.svd(uk[:, :kt].T @ ut[:, :kt], compute_uv=False), 0, 1)
        out["rotation"][str(r)] = float(np.sqrt(np.clip(1 - cos**2, 0, None)).mean())
    flat = np.sort((d**2).reshape(-1))[::-1]
    out["coord_energy_top"] = {
        str(p): share(float(flat[: math.ceil(p * d.size)].sum()), dsq) for p in (0.001, 0.01, 0.05)
    }
    changed = (d != 0).reshape(-1)
    size = math.ceil(0.1 * d.size)
    k = max(1, math.floor(0.1 * min_dim))
    principal = np.abs((u[:, :k] * s[:k]) @ vh[:k]).reshape(-1)
    masks = {
        "principal": np.argsort(-principal, kind="stable")[:size],
        "low_magnitude": np.argsort(np.abs(w64).reshape(-1), kind="stable")[:size],
    }
    out["enrichment"] = {
        f"{name}_0.1": (changed[idx].sum() / changed.sum()) / (size / d.size)
        if changed.sum()
        else None
        for name, idx in masks.items()
    }
    return out


def _close(got: object, want: object, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict)
        for k, v in want.items():
            _close(got[k], v, f"{where}.{k}")
    elif want is None or isinstance(want, (str, list)):
        assert got == want, where
    else:
        # abs: a sine near 0 is sqrt(1 - cos^2), where rounding of cos ~ 1e-16 shows as 1e-8.
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), where


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    w: dict[str, np.ndarray] = {}
    wt: dict[str, np.ndarray] = {}

    def base(name: str, shape: tuple[int, int]) -> np.ndarray:
        w[name] = rng.standard_normal(shape).astype(np.float32)
        return w[name]

    b = base("model.layers.0.self_attn.q_proj.weight", (40, 30))
    wt["model.layers.0.self_attn.q_proj.weight"] = b + 0.01 * np.outer(
        rng.standard_normal(40), rng.standard_normal(30)
    ).astype(np.float32)  # planted rank 1
    b = base("model.layers.0.mlp.up_proj.weight", (40, 30))
    u, _, vh = np.linalg.svd(b.astype(np.float64), full_matrices=False)
    inside = u[:, :3] @ rng.standard_normal((3, 3)) @ vh[:3]  # in the base's top-10% subspace
    wt["model.layers.0.mlp.up_proj.weight"] = (b + 0.05 * inside).astype(np.float32)
    b = base("model.layers.0.mlp.down_proj.weight", (30, 40))
    wt["model.layers.0.mlp.down_proj.weight"] = 1.5 * b  # the spectrum rescaled
    b = base("model.layers.1.self_attn.o_proj.weight", (32, 32))
    angle = 0.3
    rot = np.eye(32)
    rot[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    u, _, _ = np.linalg.svd(b.astype(np.float64))
    wt["model.layers.1.self_attn.o_proj.weight"] = (u @ rot @ u.T @ b).astype(np.float32)
    b = base("model.layers.1.mlp.gate_proj.weight", (16, 16))
    wt["model.layers.1.mlp.gate_proj.weight"] = b.copy()  # no update
    # A rank-2 base: past its rank the principal subspace stops (k is capped at the rank).
    low = (rng.standard_normal((24, 2)) @ rng.standard_normal((2, 20))).astype(np.float32)
    w["model.layers.1.mlp.up_proj.weight"] = low
    wt["model.layers.1.mlp.up_proj.weight"] = low + 0.01 * rng.standard_normal((24, 20)).astype(
        np.float32
    )
    # A zero base: no principal directions at all.
    w["model.layers.1.mlp.down_proj.weight"] = np.zeros((20, 24), np.float32)
    wt["model.layers.1.mlp.down_proj.weight"] = rng.standard_normal((20, 24)).astype(np.float32)
    b = base("lm_head.weight", (1, 50))
    wt["lm_head.weight"] = b + rng.standard_normal((1, 50)).astype(np.float32) * 0.1
    w["model.norm.weight"] = np.ones(16, np.float32)
    wt["model.norm.weight"] = np.full(16, 1.5, np.float32)
    paths = []
    for side, tensors in (("base", w), ("tuned", wt)):
        (tmp_path_factory.getbasetemp() / side).mkdir(exist_ok=True)
        path = tmp_path_factory.getbasetemp() / side / "model.safetensors"
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
        paths.append(path.parent)
    return paths[0], paths[1], {n: oracle(w[n], wt[n]) for n in w if w[n].ndim == 2}


def test_every_measure_against_the_oracle(pair: tuple[Path, Path, dict]) -> None:
    base, tuned, want = pair
    r = rlmask.spectrum(base, tuned, device="cpu", progress=False)
    rows = {row["name"]: row for row in r.rows}
    assert set(rows) == set(want)
    for name, expected in want.items():
        for key, value in expected.items():
            _close(rows[name][key], value, f"{name}:{key}")
    assert ("model.norm.weight", "1-D") in r.skipped
    # The structures show: a planted rank-1 update is all rank 1; an update inside the base's
    # top 10% subspace has all its energy there; a rescaled spectrum drifts by the factor and
    # does not rotate; no update gives zeros and no shares.
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["energy_top_k"]["1"] == pytest.approx(1.0, abs=1e-6)
    assert rows["model.layers.0.mlp.up_proj.weight"]["principal_energy"]["0.1"] == pytest.approx(
        1.0
    )
    down = rows["model.layers.0.mlp.down_proj.weight"]
    assert down["spectral_drift"] == pytest.approx(0.5) and down["rotation"]["0.1"] < 1e-6
    still = rows["model.layers.1.mlp.gate_proj.weight"]
    assert still["delta_fro"] == 0 and still["energy_top_k"]["1"] is None
    assert still["enrichment"]["principal_0.1"] is None and still["rank"] == 0
    assert rows["model.layers.1.self_attn.o_proj.weight"]["rotation"]["0.01"] > 0.05
    zero = rows["model.layers.1.mlp.down_proj.weight"]
    assert zero["principal_energy"]["0.1"] is None and zero["relative_fro"] is None


def test_breakdowns_json_and_the_command(pair: tuple[Path, Path, dict], tmp_path: Path) -> None:
    base, tuned, want = pair
    r = rlmask.spectrum(base, tuned, device="cpu", progress=False)
    # Energy shares pooled by each matrix's ||D||_F^2; relative_fro pooled as a ratio of sums.
    m = r.by_module()
    up = m.filter(m["module"] == "up_proj").row(0, named=True)
    ups = [n for n in want if n.endswith("up_proj.weight")]
    d2_up = {n: want[n]["delta_fro"] ** 2 for n in ups}
    expected = sum(d2_up[n] * want[n]["principal_energy"]["0.1"] for n in ups) / sum(d2_up.values())
    assert up["principal_energy@0.1"] == pytest.approx(expected)
    total = r.total_frame().row(0, named=True)
    d2 = {n: v["delta_fro"] ** 2 for n, v in want.items()}
    pooled = sum(d2[n] * (want[n]["energy_top_k"]["1"] or 0) for n in want) / sum(
        d2[n] for n in want if want[n]["energy_top_k"]["1"] is not None
    )
    assert total["energy_top_k@1"] == pytest.approx(pooled)
    assert total["relative_fro"] == pytest.approx(
        math.sqrt(sum(d2.values()) / sum(v["base_fro"] ** 2 for v in want.values()))
    )
    res = CliRunner().invoke(cli, ["spectrum", str(base), str(tuned), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "rank-1 share" in res.stdout and "principal directions" in res.stdout
    res = CliRunner().invoke(
        cli, ["spectrum", str(base), str(tuned), "--device", "cpu", "--format", "json"]
    )
    doc = json.loads(res.stdout)
    assert {m["name"] for m in doc["matrices"]} == set(want)
    assert doc["matrices"][0]["principal_energy"].keys() == {"0.01", "0.05", "0.1", "0.2"}
    assert {s["name"] for s in doc["skipped"]} == {"model.norm.weight"}
    res = CliRunner().invoke(
        cli,
        ["spectrum", str(base), str(tuned), "--device", "cpu", "--include", "norm"],
    )
    assert res.exit_code == 1 and "no 2-D floating update matrix" in res.stderr


def test_the_figure_shows_the_breakdown(pair: tuple[Path, Path, dict], tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    base, tuned, _ = pair
    r = rlmask.spectrum(base, tuned, device="cpu", progress=False)
    fig = r.plot()
    a1, a2, a3 = fig.axes
    per = r.by_module()
    bars = [p.get_height() for p in a1.patches][: per.height]
    np.testing.assert_allclose(bars, 100 * per["principal_energy@0.1"].fill_null(0).to_numpy())
    np.testing.assert_allclose(
        [p.get_height() for p in a2.patches], per["rotation@0.1"].fill_null(0).to_numpy()
    )
    np.testing.assert_allclose(
        [p.get_height() for p in a3.patches], 100 * per["energy_top_k@1"].fill_null(0).to_numpy()
    )
    png = tmp_path / "g.png"
    res = CliRunner().invoke(
        cli, ["spectrum", str(base), str(tuned), "--device", "cpu", "--plot", str(png)]
    )
    assert res.exit_code == 0 and png.stat().st_size > 0, res.output


def test_a_run_shares_the_base_svd_and_aligns_the_top_direction() -> None:
    """The bundled run (four checkpoints): each checkpoint's rows are the pair's, the last one's
    top direction is aligned with itself, and the alignment of an earlier one is numpy's."""
    from safetensors.torch import load_file

    from rlmask.examples import trained_path

    base, run = trained_path("base"), trained_path("run-seed1")
    r = rlmask.spectrum(base, run, device="cpu", progress=False)
    ckpts = sorted(run.iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert r.checkpoints == [str(c) for c in ckpts]
    total = r.total_frame()
    assert total["step"].to_list() == [25, 50, 75, 100]
    last = rlmask.spectrum(base, ckpts[-1], device="cpu", progress=False)
    pair = {row["name"]: row for row in last.rows}
    for row in r.rows:
        if row["step"] == 100:
            for key, value in pair[row["name"]].items():
                _close(row[key], value, f"{row['name']}:{key}")
            assert row["rank1_alignment"] == pytest.approx(1.0, abs=1e-9)

    def bf16(path: Path, name: str) -> np.ndarray:
        raw = load_file(str(path / "model.safetensors"))[name].view(torch.int16).numpy()
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    name = "model.layers.0.mlp.up_proj.weight"
    w = bf16(base, name).astype(np.float64)
    d_t = bf16(ckpts[0], name).astype(np.float64) - w
    d_final = bf16(ckpts[-1], name).astype(np.float64) - w
    u, _, vh = np.linalg.svd(d_t)
    uf, _, vhf = np.linalg.svd(d_final)
    want = abs(u[:, 0] @ uf[:, 0]) * abs(vh[0] @ vhf[0])
    (got,) = [x["rank1_alignment"] for x in r.rows if x["name"] == name and x["step"] == 25]
    assert got == pytest.approx(want, rel=1e-6)
    # The run's figure: one panel per question, over the steps.
    import matplotlib

    matplotlib.use("Agg")
    fig = r.plot()
    first = fig.axes[0].get_lines()[0]
    assert list(first.get_xdata()) == [25, 50, 75, 100]
    np.testing.assert_allclose(first.get_ydata(), 100 * total["principal_energy@0.1"].to_numpy())


def test_the_command_over_a_run(tmp_path: Path) -> None:
    from rlmask.examples import trained_path

    run = trained_path("run-seed1")
    ckpts = [str(c) for c in sorted(run.iterdir(), key=lambda p: int(p.name.split("-")[1]))]
    args = ["spectrum", str(trained_path("base")), *ckpts[:2], "--device", "cpu"]
    res = CliRunner().invoke(cli, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["checkpoints"] == ckpts[:2] and {m["checkpoint"] for m in doc["matrices"]} == set(
        ckpts[:2]
    )
    res = CliRunner().invoke(cli, ["spectrum", str(trained_path("base")), str(run), "-q"])
    assert res.exit_code == 0 and "per checkpoint" in res.stdout and "step    100" in res.stdout


def test_resized_rows_are_measured_on_the_rows_both_share(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((10, 8)).astype(np.float32)
    wt = np.concatenate([w + 0.01 * rng.standard_normal((10, 8)), rng.standard_normal((3, 8))])
    wt = wt.astype(np.float32)
    name = "model.embed_tokens.weight"
    for side, t in (("a", w), ("b", wt)):
        save_file({name: torch.from_numpy(t)}, tmp_path / f"{side}.safetensors")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    with pytest.raises(rlmask.TensorMismatchError):
        rlmask.spectrum(a, b, device="cpu", progress=False)
    r = rlmask.spectrum(a, b, device="cpu", shared_rows=True, progress=False)
    (row,) = r.rows
    assert row["shape"] == [10, 8]
    for key, value in oracle(w, wt[:10]).items():
        _close(row[key], value, key)


def _llm_like(rng: np.random.Generator, m: int, n: int, decay: float) -> np.ndarray:
    """A base with an LLM-like spectrum: a head decaying as i^-decay over a noise floor."""
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    head = (u[:, :k] * (1.0 + np.arange(k)) ** -decay) @ v[:, :k].T
    return (10 * head + 0.01 * rng.standard_normal((m, n))).astype(np.float32)


def test_the_randomised_path_against_the_exact_one(tmp_path: Path) -> None:
    """The randomised path (design §13) on LLM-like bases with an RL-like update (5% of the
    entries moved a little, plus a rank-1 part): its error against the exact oracle, measure
    by measure, within the bounds design §13 states; nulls where a whole spectrum is needed;
    the figures that need no SVD exact; the same seed the same rows."""
    rng = np.random.default_rng(1)
    w: dict[str, np.ndarray] = {}
    wt: dict[str, np.ndarray] = {}
    for i, (m, n, decay) in enumerate([(300, 200, 0.5), (200, 360, 1.0), (256, 256, 0.3)]):
        b = _llm_like(rng, m, n, decay)
        d = np.where(rng.random(b.shape) < 0.05, 0.01 * rng.standard_normal(b.shape), 0.0)
        d += 0.02 * np.outer(rng.standard_normal(m), rng.standard_normal(n))
        name = f"model.layers.{i}.mlp.up_proj.weight"
        w[name], wt[name] = b, (b + d).astype(np.float32)
    # A matrix at the threshold stays exact.
    w["model.layers.3.mlp.up_proj.weight"] = _llm_like(rng, 10, 10, 1.0)
    wt["model.layers.3.mlp.up_proj.weight"] = w["model.layers.3.mlp.up_proj.weight"] * 1.01
    for side, tensors in (("base", w), ("tuned", wt)):
        (tmp_path / side).mkdir()
        save_file(
            {k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / side / "m.safetensors"
        )
    kw = {"device": "cpu", "progress": False, "randomized_above": 100}
    bounds = {  # the largest error allowed (absolute; relative for the norm), design §13
        "energy_top_k": 1e-4,
        "spectral_norm": 1e-9,
        "stable_rank": 1e-9,
        "principal_energy": 2e-2,
        "left_principal_energy": 6e-2,
        "right_principal_energy": 6e-2,
        "rotation": 3e-2,
        "enrichment": 1e-2,
    }
    want = {n: oracle(w[n], wt[n]) for n in w}
    worst: dict[str, float] = {}
    for seed in range(5):  # the error over sketches, not one lucky draw
        r = rlmask.spectrum(tmp_path / "base", tmp_path / "tuned", seed=seed, **kw)  # type: ignore[arg-type]
        rows = {row["name"]: row for row in r.rows}
        assert rows["model.layers.3.mlp.up_proj.weight"]["svd"] == "exact"
        for name, row in rows.items():
            if row["svd"] == "exact":
                continue
            exact = want[name]
            for key in ("effective_rank", "rank", "spectral_drift"):
                assert row[key] is None, key
            for key in ("delta_fro", "base_fro", "relative_fro", "coord_energy_top"):
                _close(row[key], exact[key], f"{name}:{key}")  # no SVD: exact
            for key in bounds:
                got, exp = row[key], exact[key]
                pairs = (
                    [(got[k], v) for k, v in exp.items()] if isinstance(exp, dict) else [(got, exp)]
                )
                for g, e in pairs:
                    err = abs(g - e) / (abs(e) if key == "spectral_norm" else 1.0)
                    worst[key] = max(worst.get(key, 0.0), err)
            # r <= 0.05: the top directions, which the range finder gets best.
            for key in ("principal_energy", "left_principal_energy", "right_principal_energy"):
                for ratio in ("0.01", "0.05"):
                    assert row[key][ratio] == pytest.approx(exact[key][ratio], abs=5e-3)
    print("randomised path, largest error against the exact oracle:", worst)
    for key, bound in bounds.items():
        assert worst[key] <= bound, (key, worst[key])
    again = rlmask.spectrum(tmp_path / "base", tmp_path / "tuned", seed=4, **kw)  # type: ignore[arg-type]
    for x, y in zip(again.rows, r.rows, strict=True):
        assert {k: v for k, v in x.items() if v != y[k]} == {}, x["name"]
    other = rlmask.spectrum(tmp_path / "base", tmp_path / "tuned", seed=3, **kw)  # type: ignore[arg-type]
    assert other.rows != r.rows
    # The command takes the same options; a negative size is a usage error.
    args = ["spectrum", str(tmp_path / "base"), str(tmp_path / "tuned"), "-q"]
    out = CliRunner().invoke(cli, [*args, "--randomized-above", "100", "--format", "json"])
    assert out.exit_code == 0, out.stderr
    assert [m["svd"] for m in json.loads(out.stdout)["matrices"]] == [x["svd"] for x in r.rows]
    table = CliRunner().invoke(cli, [*args, "--randomized-above", "100"])
    assert table.exit_code == 0, table.stderr
    assert "3 of them on the randomised path" in table.stdout
    assert CliRunner().invoke(cli, [*args, "--randomized-above", "-1"]).exit_code == 2
