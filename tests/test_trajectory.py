"""`rlmask trajectory` against a numpy oracle on byte-written checkpoint series (design §6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import rlmask
from oracle import changed, write_raw
from rlmask._trajectory import discover, step_of
from rlmask.cli import cli

# (name, dtype, numel): one tensor crosses the core's chunk boundary (2^18 elements).
TENSORS = [
    ("model.layers.0.mlp.up_proj.weight", "BF16", 300_001),
    ("model.layers.1.self_attn.q_proj.weight", "F32", 1_000),
    ("model.layers.1.input_layernorm.weight", "F16", 77),
    ("lm_head.weight", "BF16", 64),
]
NP = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
STEPS = [5, 10, 100, 40]  # written out of order: the run is 5, 10, 40, 100


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_raw(
        path / "model.safetensors",
        [(n, dt, [arrays[n].size], arrays[n].tobytes()) for n, dt, _ in TENSORS],
        pad_to=8,
    )


def _run(tmp_path: Path) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A base and four checkpoints whose changes grow, move, and partly return."""
    rng = np.random.default_rng(7)
    base = {}
    for name, dtype, n in TENSORS:
        if dtype == "F32":
            base[name] = rng.standard_normal(n).astype(np.float32).view(np.uint32)
        elif dtype == "F16":
            base[name] = rng.standard_normal(n).astype(np.float16).view(np.uint16)
        else:
            base[name] = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(
                np.uint16
            )
    _write(tmp_path / "base", base)
    ckpts, current = [], {k: v.copy() for k, v in base.items()}
    for step in sorted(STEPS):
        for name, _, n in TENSORS:
            x = current[name]
            moved = rng.random(n) < 0.05
            x[moved] ^= 1 << int(rng.integers(0, 3))  # a few ULPs, some below the tolerance
            back = rng.random(n) < 0.3
            x[back] = base[name][back]  # some elements return to the base value
        ckpts.append({k: v.copy() for k, v in current.items()})
        _write(tmp_path / "run" / f"checkpoint-{step}", current)
    return base, ckpts


def _oracle(base, ckpts, tol):  # type: ignore[no-untyped-def]
    out = {}
    for name, dt, _ in TENSORS:
        vs = [changed(dt, base[name], dt, c[name], tol=tol) for c in ckpts]
        prev = [base[name], *(c[name] for c in ckpts[:-1])]
        cons = [changed(dt, p, dt, c[name], tol=tol) for p, c in zip(prev, ckpts, strict=True)]
        final = vs[-1]
        ever = np.logical_or.reduce(vs)
        out[name] = {
            "changed_vs_base": [int(v.sum()) for v in vs],
            "changed_consecutive": [int(c.sum()) for c in cons],
            "outside_final": [int((v & ~final).sum()) for v in vs],
            "never": int((~ever).sum()),
            "returned": int((ever & ~final).sum()),
            "final": int(final.sum()),
            "bits": vs,
        }
    return out


@pytest.mark.parametrize("tol", [1e-5, 0.0])
def test_figures_match_the_oracle(tmp_path: Path, tol: float) -> None:
    base, ckpts = _run(tmp_path)
    want = _oracle(base, ckpts, tol)
    masks = tmp_path / "masks"
    report = rlmask.trajectory(
        tmp_path / "base", tmp_path / "run", tol=tol, save_masks=masks, progress=False
    )
    assert report.steps == sorted(STEPS)
    d = report.to_dict()
    for t in d["tensors"]:
        w = want[t["name"]]
        for key in ("changed_vs_base", "changed_consecutive", "outside_final"):
            assert t[key] == w[key], (t["name"], key)
        assert (t["never"], t["returned"], t["final"]) == (w["never"], w["returned"], w["final"])
    numel = sum(n for _, _, n in TENSORS)
    assert d["numel"] == numel
    for k, c in enumerate(d["checkpoints"]):
        vs = sum(w["changed_vs_base"][k] for w in want.values())
        cons = sum(w["changed_consecutive"][k] for w in want.values())
        out = sum(w["outside_final"][k] for w in want.values())
        assert c["step"] == sorted(STEPS)[k]
        assert c["changed_vs_base"] == vs and c["sparsity_vs_base"] == pytest.approx(1 - vs / numel)
        assert c["changed_consecutive"] == cons
        assert c["outside_final"] == pytest.approx(out / vs)
    assert d["categories"] == {
        k: sum(w[k] for w in want.values()) for k in ("never", "returned", "final")
    }
    assert d["categories"]["returned"] > 0 and d["categories"]["never"] > 0
    # One mask per checkpoint, streamed from the same pass.
    for k, step in enumerate(sorted(STEPS)):
        m = rlmask.load_mask(masks / f"step-{step}.rlmask")
        for name, _, _ in TENSORS:
            np.testing.assert_array_equal(m[name].reshape(-1), want[name]["bits"][k])
    # A trajectory of one checkpoint is a diff.
    one = rlmask.trajectory(
        tmp_path / "base", tmp_path / "run" / "checkpoint-5", tol=tol, progress=False
    )
    plain = rlmask.diff(
        tmp_path / "base", tmp_path / "run" / "checkpoint-5", tol=tol, progress=False
    )
    assert one.to_dict()["checkpoints"][0]["changed_vs_base"] == plain.changed


def test_breakdowns_sum_to_the_totals(tmp_path: Path) -> None:
    _run(tmp_path)
    report = rlmask.trajectory(tmp_path / "base", tmp_path / "run", progress=False)
    total = report.total_frame()
    for level in ("module", "tensor"):
        g = (
            report.by(level)
            .group_by("checkpoint")
            .agg(pl.col("changed_vs_base").sum())
            .sort("checkpoint")
        )
        assert g["changed_vs_base"].to_list() == total["changed_vs_base"].to_list()
    layers = report.by_layer()
    assert sorted(set(layers["layer"])) == [0, 1]


def test_discovery_orders_runs_naturally(tmp_path: Path) -> None:
    _run(tmp_path)
    run = tmp_path / "run"
    want = [str(run / f"checkpoint-{s}") for s in sorted(STEPS)]
    assert discover([run]) == want
    assert discover([str(run / "checkpoint-*")]) == want
    assert discover([run / "checkpoint-100", run / "checkpoint-5"]) == [want[0], want[-1]]
    assert [step_of(p) for p in ("global_step_12", "iter_0000300", "step-7", "final")] == [
        12,
        300,
        7,
        None,
    ]
    with pytest.raises(rlmask.CheckpointNotFoundError, match="matches nothing"):
        discover([str(run / "nothing-*")])
    with pytest.raises(ValueError, match="given twice"):
        discover([run / "checkpoint-5", run / "checkpoint-5"])


def test_incomplete_and_unpaired_checkpoints(tmp_path: Path) -> None:
    _, ckpts = _run(tmp_path)
    # One checkpoint lacks a tensor: it is left out of every figure and listed.
    odd = tmp_path / "odd"
    odd.mkdir()
    write_raw(
        odd / "model.safetensors",
        [
            (n, dt, [ckpts[0][n].size], ckpts[0][n].tobytes())
            for n, dt, _ in TENSORS
            if n != "lm_head.weight"
        ],
    )
    r = rlmask.trajectory(
        tmp_path / "base", [tmp_path / "run" / "checkpoint-5", odd], progress=False
    )
    assert r.incomplete == [("lm_head.weight", [2])]
    assert "lm_head.weight" not in r.tensors["name"].to_list()
    # A checkpoint that shares almost nothing with the base is refused.
    stray = tmp_path / "stray.safetensors"
    write_raw(
        stray,
        [
            ("other", "F32", [4], bytes(16)),
            ("lm_head.weight", "BF16", [64], ckpts[0]["lm_head.weight"].tobytes()),
        ],
    )
    with pytest.raises(rlmask.PairingError, match="have no tensor of the same name"):
        rlmask.trajectory(
            tmp_path / "base", [tmp_path / "run" / "checkpoint-5", stray], progress=False
        )


def test_cli_outputs_and_plot(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")

    _run(tmp_path)
    base, run = str(tmp_path / "base"), str(tmp_path / "run")
    r = CliRunner().invoke(cli, ["trajectory", base, run, "--format", "json", "-q"])
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    want = rlmask.trajectory(base, run, progress=False).to_dict()
    assert got["checkpoints"] == want["checkpoints"] and got["categories"] == want["categories"]
    assert set(got) >= {
        "base",
        "criterion",
        "tolerance",
        "numel",
        "checkpoints",
        "categories",
        "tensors",
    }
    r = CliRunner().invoke(cli, ["trajectory", base, run])
    assert r.exit_code == 0 and "final subnetwork" in r.stdout and "checkpoint-100" in r.stdout
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"t.{fmt}"
        r = CliRunner().invoke(
            cli, ["trajectory", base, run, "--by", "module", "--format", fmt, "-o", str(out)]
        )
        assert r.exit_code == 0, r.stderr
        df = pl.read_csv(out) if fmt == "csv" else pl.read_parquet(out)
        assert df.height == 4 * df["module"].n_unique()
    png = tmp_path / "run.png"
    r = CliRunner().invoke(cli, ["trajectory", base, run, "--plot", str(png)])
    assert r.exit_code == 0 and png.stat().st_size > 0
    fig = rlmask.trajectory(base, run, progress=False).plot()  # trajectory_figure
    a1, a2, a3 = fig.axes
    assert [line.get_label() for line in a1.get_lines()] == ["against the base", "against previous"]
    assert list(a1.get_lines()[0].get_xdata()) == sorted(STEPS) and a1.get_xlabel() == "step"
    modules = {"up_proj", "q_proj", "input_layernorm", "lm_head"}
    assert len(a2.patches) == 3 * len(modules)
    assert "Figure 6" in a3.get_title()
    # Figure 6 as the paper draws it (a share of all elements), and of the step's own changes.
    t = rlmask.trajectory(base, run, progress=False).total_frame()
    paper, own = a3.get_lines()
    assert "paper's Figure 6" in str(paper.get_label())
    outside = t["outside_final_share"] * t["changed_vs_base"]
    np.testing.assert_allclose(paper.get_ydata(), (100 * outside / t["numel"]).to_numpy())
    np.testing.assert_allclose(own.get_ydata(), (100 * t["outside_final_share"]).to_numpy())
    # Usage errors: a tolerance with exact, nothing to compare.
    assert (
        CliRunner()
        .invoke(cli, ["trajectory", base, run, "--criterion", "exact", "--tol", "0.1"])
        .exit_code
        == 2
    )
    r = CliRunner().invoke(cli, ["trajectory", base, run, "--include", "nothing"])
    assert r.exit_code == 1 and "nothing to compare" in r.stderr


def test_ray_segments_give_the_local_report(tmp_path: Path) -> None:
    import ray

    _run(tmp_path)
    base, run = tmp_path / "base", tmp_path / "run"
    local = rlmask.trajectory(base, run, save_masks=tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for segments in (2, 3):
            masks = tmp_path / f"ray{segments}"
            remote = rlmask.trajectory(
                base, run, executor="ray", segments=segments, save_masks=masks, progress=False
            )
            assert remote.to_dict() == local.to_dict(), segments
            for f in sorted((tmp_path / "local").iterdir()):
                assert (masks / f.name).read_bytes() == f.read_bytes()
            # Only the masks asked for are left in the shared folder.
            assert sorted(p.name for p in masks.iterdir()) == sorted(
                p.name for p in (tmp_path / "local").iterdir()
            )
    finally:
        ray.shutdown()
