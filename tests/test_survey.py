"""`rlmask survey`: many pairs against a numpy oracle, manifests, failures, resuming, parallel
and Ray executors (design §7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import rlmask
from oracle import expected_report, write_raw
from rlmask.cli import cli

SWEEP = list(rlmask.DEFAULT_SWEEP)


def _checkpoint(path: Path, rng: np.random.Generator, base: dict | None, moved: float) -> dict:
    """A bf16 + f32 checkpoint; with ``base``, a copy of it with some elements moved."""
    if base is None:
        arrays = {
            "model.layers.0.mlp.up_proj.weight": (
                "BF16",
                (rng.standard_normal(5000).astype(np.float32).view(np.uint32) >> 16).astype(
                    np.uint16
                ),
            ),
            "model.layers.1.self_attn.q_proj.weight": (
                "F32",
                rng.standard_normal(3000).astype(np.float32).view(np.uint32),
            ),
        }
    else:
        arrays = {}
        for name, (dt, bits) in base.items():
            new = bits.copy()
            idx = rng.random(bits.size) < moved
            new[idx] += rng.integers(1, 300, idx.sum()).astype(new.dtype)
            arrays[name] = (dt, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_raw(path, [(n, dt, [b.size], b.tobytes()) for n, (dt, b) in arrays.items()])
    return arrays


def _study(tmp_path: Path) -> tuple[Path, dict[str, dict[str, list[int]]], dict]:
    """Three pairs in two groups and a TOML manifest with relative paths; the oracle's counts
    and the base's arrays."""
    rng = np.random.default_rng(3)
    base = _checkpoint(tmp_path / "models" / "base.safetensors", rng, None, 0)
    want = {}
    for name, moved in (("grpo-a", 0.05), ("grpo-b", 0.10), ("sft", 0.6)):
        tuned = _checkpoint(tmp_path / "models" / f"{name}.safetensors", rng, base, moved)
        counts = expected_report(base, tuned, SWEEP)
        want[name] = {"changed": [sum(c[i] for c in counts.values()) for i in range(4)]}
    manifest = tmp_path / "survey.toml"
    manifest.write_text(
        "\n".join(
            f'[[pair]]\nname = "{n}"\nbase = "models/base.safetensors"\n'
            f'tuned = "models/{n}.safetensors"\ngroup = "{"SFT" if n == "sft" else "GRPO"}"\n'
            for n in want
        )
    )
    return manifest, want, base


def test_rows_and_groups_match_the_oracle(tmp_path: Path) -> None:
    manifest, want, _base = _study(tmp_path)
    report = rlmask.survey(manifest, tolerances=SWEEP, cache="")
    numel = 8000
    assert report.tensors.height == 3 * 4
    for r in report.tensors.iter_rows(named=True):
        k = SWEEP.index(r["tolerance"])
        assert r["status"] == "ok" and r["numel"] == numel
        assert r["changed"] == want[r["name"]]["changed"][k]
        assert r["sparsity"] == pytest.approx(1 - r["changed"] / numel)
    g = report.by_group().filter(pl.col("tolerance") == 1e-5)
    grpo = g.filter(pl.col("group") == "GRPO").row(0, named=True)
    changed = want["grpo-a"]["changed"][3] + want["grpo-b"]["changed"][3]
    assert grpo["pairs"] == 2 and grpo["sparsity"] == pytest.approx(1 - changed / (2 * numel))
    assert grpo["sparsity_min"] == pytest.approx(1 - want["grpo-b"]["changed"][3] / numel)


def test_csv_manifests_and_manifest_errors(tmp_path: Path) -> None:
    manifest, _, _ = _study(tmp_path)
    csv = tmp_path / "survey.csv"
    csv.write_text(
        "name,base,tuned,group,include\n"
        "grpo-a,models/base.safetensors,models/grpo-a.safetensors,GRPO,mlp\n"
        "sft,models/base.safetensors,models/sft.safetensors,SFT,\n"
    )
    r = rlmask.survey(csv, cache="")
    toml = rlmask.survey(manifest, cache="", tol=1e-5)
    a = r.tensors.filter(pl.col("name") == "sft").row(0, named=True)
    b = toml.tensors.filter(pl.col("name") == "sft").row(0, named=True)
    assert a["changed"] == b["changed"]
    # include=mlp: only the bf16 matrix is compared in that pair.
    assert r.tensors.filter(pl.col("name") == "grpo-a")["numel"].item() == 5000
    bad = {
        "empty.toml": ("", "lists no pairs"),
        "nobase.toml": ('[[pair]]\nname = "x"\ntuned = "t"\n', "'base' is missing"),
        "extra.toml": ('[[pair]]\nname="x"\nbase="b"\ntuned="t"\ncolour="red"\n', "unknown keys"),
        "twice.csv": ("name,base,tuned\nx,b,t\nx,b,t\n", "used twice"),
        "header.csv": ("name,base,tuned\n", "lists no pairs"),
    }
    for fname, (text, want) in bad.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(ValueError, match=want):
            rlmask.load_manifest(tmp_path / fname)
        code = CliRunner().invoke(cli, ["survey", str(tmp_path / fname)]).exit_code
        assert code == 2, fname


def test_a_failed_pair_is_reported_and_the_survey_resumes(tmp_path: Path) -> None:
    manifest, want, base = _study(tmp_path)
    sft = tmp_path / "models" / "sft.safetensors"
    saved = sft.read_bytes()
    sft.unlink()
    r = CliRunner().invoke(cli, ["survey", str(manifest), "--format", "json"])
    assert r.exit_code == 1 and "1 pairs failed: sft" in r.stderr
    rows = json.loads(r.stdout)["rows"]
    status = {row["name"]: row["status"] for row in rows}
    assert status == {"grpo-a": "ok", "grpo-b": "ok", "sft": "error"}
    assert "CheckpointNotFoundError" in next(x["error"] for x in rows if x["name"] == "sft")
    # Resumed: what was done is read back; the missing pair is computed.
    sft.write_bytes(saved)
    seen: dict[str, str] = {}
    report = rlmask.survey(manifest, on_result=lambda p, s: seen.__setitem__(p.name, s))
    assert seen == {"grpo-a": "cached", "grpo-b": "cached", "sft": "ok"}
    assert (
        report.tensors.filter(pl.col("name") == "sft")["changed"].item()
        == want["sft"]["changed"][3]
    )
    # A changed file invalidates its own pair only.
    rng = np.random.default_rng(9)
    new = _checkpoint(tmp_path / "models" / "grpo-a.safetensors", rng, base, 0.5)
    seen.clear()
    report = rlmask.survey(manifest, on_result=lambda p, s: seen.__setitem__(p.name, s))
    assert seen == {"grpo-a": "ok", "grpo-b": "cached", "sft": "cached"}
    got = report.tensors.filter(pl.col("name") == "grpo-a")["changed"].item()
    assert got == sum(c[0] for c in expected_report(base, new, [1e-5]).values())


def test_parallel_and_ray_executors_give_the_same_report(tmp_path: Path) -> None:
    import ray

    manifest, _, _ = _study(tmp_path)
    one = rlmask.survey(manifest, tolerances=SWEEP, cache="").to_dict()
    two = rlmask.survey(manifest, tolerances=SWEEP, cache="", jobs=3).to_dict()
    assert two == one
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = rlmask.survey(manifest, tolerances=SWEEP, cache="", executor="ray").to_dict()
    finally:
        ray.shutdown()
    assert remote == one


def test_cli_outputs_and_figure_1(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")

    manifest, want, _base = _study(tmp_path)
    out = tmp_path / "groups.csv"
    png = tmp_path / "figure1.png"
    r = CliRunner().invoke(
        cli,
        [
            "survey",
            str(manifest),
            "--sweep",
            "--by",
            "group",
            "--format",
            "csv",
            "-o",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert r.exit_code == 0, r.stderr
    groups = pl.read_csv(out)
    assert groups.height == 2 * 4 and set(groups["group"]) == {"GRPO", "SFT"}
    assert png.stat().st_size > 0
    r = CliRunner().invoke(cli, ["survey", str(manifest)])
    assert r.exit_code == 0 and "grpo-b" in r.stdout and "3 pairs, 0 failed" in r.stdout
    fig = rlmask.survey(manifest, tol=1e-6, tolerances=SWEEP).plot()  # survey_figure
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert len(bars) == 3
    heights = sorted(round(b.get_height(), 6) for b in bars)
    # At the primary tolerance (1e-6, index 2 of the sweep), not the largest of the sweep.
    assert heights == sorted(round(100 * (1 - w["changed"][2] / 8000), 6) for w in want.values())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GRPO", "SFT"]
    assert os.path.isdir(f"{manifest}.cache")


def test_ctrl_c_stops_a_parallel_survey(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from oracle import sparse_pair

    lines = []
    for i in range(2):
        folder = tmp_path / f"p{i}"
        folder.mkdir()
        a, b = sparse_pair(folder, 1 << 30)  # 4 GiB each in holes: seconds to read
        lines.append(f'[[pair]]\nname = "p{i}"\nbase = "{a}"\ntuned = "{b}"\n')
    manifest = tmp_path / "m.toml"
    manifest.write_text("\n".join(lines))
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from rlmask.cli import main; main()",
            "survey",
            str(manifest),
            "--jobs",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    assert p.poll() is None
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and time.monotonic() - sent < 2.0, err
    assert not any(Path(f"{manifest}.cache").glob("*.json"))


def test_options_are_built_and_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One criterion parse per command, whatever the number of pairs (issue 28): the command
    builds the options once, and every pair (and its cache key) reuses them."""
    import rlmask._diff
    import rlmask._options
    import rlmask._trajectory

    manifest, want, _ = _study(tmp_path)
    parsed: list[str] = []
    real = rlmask._diff.parse_criterion

    def counting(criterion: str, *args: object, **kwargs: object) -> object:
        parsed.append(criterion)
        return real(criterion, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rlmask._diff, "parse_criterion", counting)
    monkeypatch.setattr(rlmask._trajectory, "parse_criterion", counting)
    monkeypatch.setattr(rlmask._options, "parse_criterion", counting)
    r = CliRunner().invoke(cli, ["survey", str(manifest), "--sweep", "--format", "json", "-q"])
    assert r.exit_code == 0, r.stderr
    assert parsed == ["absolute"]
    got = json.loads(r.stdout)
    for name, counts in want.items():
        rows = [row for row in got["rows"] if row["name"] == name]
        assert [row["changed"] for row in rows] == counts["changed"]
    models = tmp_path / "models"
    for command in (["diff"], ["trajectory"]):
        parsed.clear()
        args = [str(models / "base.safetensors"), str(models / "grpo-a.safetensors")]
        r = CliRunner().invoke(cli, [*command, *args, "--format", "json", "-q"])
        assert r.exit_code == 0, r.stderr
        assert parsed == ["absolute"], command


def test_a_sampled_survey_carries_each_pair_interval(tmp_path: Path) -> None:
    """--sample on a survey: every pair estimated from its sample, each row with its 95%
    interval; a sample of everything gives the oracle's counts and intervals of no width; the
    sample is part of the cache key (a cached full survey is not reused for a sample)."""
    manifest, want, _ = _study(tmp_path)
    full = rlmask.survey(manifest, tolerances=SWEEP)
    whole = rlmask.survey(manifest, tolerances=SWEEP, sample=1.0)
    assert set(whole.tensors["status"]) == {"ok"}  # not the full survey's cache entries
    for name, counts in want.items():
        rows = whole.tensors.filter(pl.col("name") == name)
        assert rows["changed"].to_list() == counts["changed"]
        assert (rows["sparsity_low"] == rows["sparsity"]).all()
        assert (rows["sparsity_high"] == rows["sparsity"]).all()
    assert "sparsity_low" not in full.tensors.columns
    r = CliRunner().invoke(
        cli, ["survey", str(manifest), "--sample", "30%", "--seed", "1", "--format", "json", "-q"]
    )
    assert r.exit_code == 0, r.stderr
    for row in json.loads(r.stdout)["rows"]:
        assert row["sparsity_low"] <= row["sparsity"] <= row["sparsity_high"]
