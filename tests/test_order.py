"""Natural order everywhere: model.layers.2 before model.layers.10, in frames, files and masks."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from rlmask.cli import cli


def test_layers_are_in_natural_order(tmp_path: Path) -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)]
    base = {n: torch.zeros(4, 4) for n in names}
    tuned = {n: torch.ones(4, 4) for n in names}
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    want = names  # 0, 1, ..., 11 (sorted as text: 0, 1, 10, 11, 2, ...)
    assert sorted(names) != want
    report = rlmask.diff(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", mask=True, progress=False
    )
    assert report.tensors["name"].to_list() == want
    assert [t["name"] for t in report.to_dict()["tensors"]] == want
    # The JSON text (records written one at a time) is the dict, record for record.
    assert json.loads(report.to_json()) == report.to_dict()
    assert json.loads(report.to_json(indent=2)) == report.to_dict()
    out = tmp_path / "t.csv"
    r = CliRunner().invoke(
        cli,
        [
            "diff",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "--by",
            "tensor",
            "--format",
            "csv",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0 and pl.read_csv(out)["name"].to_list() == want
    assert report.mask is not None and report.mask.names == want
    report.mask.save(tmp_path / "m.rlmask")
    assert rlmask.load_mask(tmp_path / "m.rlmask").names == want
    assert rlmask.overlap(report.mask, report.mask).tensors["name"].to_list() == want
    ranked = rlmask.rank(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", device="cpu", progress=False
    )
    assert ranked.tensors["name"].to_list() == want
    run = tmp_path / "run" / "checkpoint-1"
    run.mkdir(parents=True)
    save_file(tuned, run / "model.safetensors")
    traj = rlmask.trajectory(tmp_path / "a.safetensors", tmp_path / "run", progress=False)
    assert traj.tensors["name"].to_list() == want


def test_reports_read_well_in_a_repl_and_a_notebook(tmp_path: Path) -> None:
    from rlmask.examples import trained_path

    base, s1, s2 = trained_path("base"), trained_path("rl-seed1"), trained_path("rl-seed2")
    d = rlmask.diff(base, s1, mask=True, progress=False)
    d2 = rlmask.diff(base, s2, mask=True, progress=False)
    assert d.mask is not None and d2.mask is not None
    reports = [
        d,
        rlmask.overlap(d.mask, d2.mask),
        rlmask.overlap_matrix([d.mask, d2.mask, d.mask & d2.mask]),
        rlmask.trajectory(base, trained_path("run-seed1"), progress=False),
        rlmask.rank(base, s1, device="cpu", progress=False),
    ]
    for r in reports:
        text = repr(r)
        assert text.startswith(f"<{type(r).__name__}>\n") and r.summary() in text
        assert "shape: (" not in text  # no squashed polars print
        html = r._repr_html_()
        assert "<table" in html and type(r).__name__ in html
    assert f"{100 * d.sparsity:7.3f}%" in repr(d)
    assert "<table" in d.mask._repr_html_() and "q_proj" in d.mask._repr_html_()
