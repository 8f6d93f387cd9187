"""Update rank against torch.linalg.matrix_rank / svdvals run directly on the same float32
difference, on bf16 checkpoints whose updates have known ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rlmask
from rlmask.cli import cli


def _ints(rng: np.random.Generator, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    return rng.integers(lo, hi + 1, shape).astype(np.float64)


def _known_rank_pair(tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    """Integer-valued weights and updates, exact in bf16, so the float32 difference is exactly
    the intended update and its rank is known (checked in float64 by numpy)."""
    rng = np.random.default_rng(0)
    base, delta = {}, {}

    def add(name: str, d: np.ndarray) -> None:
        base[name] = _ints(rng, d.shape, -8, 8)
        delta[name] = d

    uv = lambda m, n, r: _ints(rng, (m, r), -1, 1) @ _ints(rng, (r, n), -1, 1)  # noqa: E731
    add("model.layers.0.self_attn.q_proj.weight", uv(48, 40, 3))  # exact low rank
    add("model.layers.0.self_attn.k_proj.weight", uv(24, 40, 1))  # rank 1
    add("model.layers.0.mlp.up_proj.weight", _ints(rng, (32, 32), -3, 3))  # full rank
    zr = _ints(rng, (40, 30), -2, 2)
    zr[:10] = 0
    zr[:, :5] = 0
    add("model.layers.1.mlp.down_proj.weight", zr)  # zero rows and columns
    add("model.layers.1.self_attn.o_proj.weight", np.zeros((16, 16)))  # no update
    add("model.embed_tokens.weight", uv(64, 16, 2))
    add("lm_head.weight", uv(64, 16, 4))
    add("model.layers.0.input_layernorm.weight", _ints(rng, (16,), 0, 1))
    add("model.layers.0.mlp.up_proj.bias", _ints(rng, (32,), 0, 1))
    expected = {n: int(np.linalg.matrix_rank(d)) for n, d in delta.items() if d.ndim == 2}
    assert expected["model.layers.0.self_attn.q_proj.weight"] == 3
    assert expected["model.layers.1.mlp.down_proj.weight"] == 25
    for side, values in (("base", base), ("tuned", {n: base[n] + delta[n] for n in base})):
        t = {n: torch.from_numpy(v).to(torch.bfloat16) for n, v in values.items()}
        for n, v in values.items():
            assert torch.equal(t[n].double(), torch.from_numpy(v)), "not exact in bf16"
        save_file(t, tmp_path / f"{side}.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", expected


def _deltas(a: Path, b: Path) -> dict[str, torch.Tensor]:
    ta, tb = load_file(a), load_file(b)
    return {n: tb[n].float() - ta[n].float() for n in ta}


def test_known_ranks_and_every_figure(tmp_path: Path) -> None:
    a, b, expected = _known_rank_pair(tmp_path)
    r = rlmask.rank(a, b, device="cpu", top_k=2, progress=False)
    rows = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    assert {n: row["rank"] for n, row in rows.items()} == expected
    deltas = _deltas(a, b)
    for n, row in rows.items():
        d = deltas[n]
        s = torch.linalg.svdvals(d).double()
        m, k = d.shape
        assert row["rank"] == int(torch.linalg.matrix_rank(d))
        assert row["max_rank"] == min(m, k) and row["shape"] == [m, k]
        assert row["rank_fraction"] == row["rank"] / min(m, k)
        assert row["sigma_max"] == pytest.approx(float(s[0]), rel=1e-6)
        if float(s[0]) == 0:
            assert row["rank"] == 0
            assert row["stable_rank"] is None and row["energy_top1"] is None
            continue
        e = s.square()
        assert row["stable_rank"] == pytest.approx(float(e.sum() / e[0]), rel=1e-6)
        assert row["energy_top1"] == pytest.approx(float(e[0] / e.sum()), rel=1e-6)
        assert row["energy_topk"] == pytest.approx(float(e[:2].sum() / e.sum()), rel=1e-6)
        p = s / s.sum()
        p = p[p > 0]
        assert row["effective_rank"] == pytest.approx(
            math.exp(float(-(p * p.log()).sum())), rel=1e-6
        )
    assert r.mean_rank_fraction == pytest.approx(
        np.mean([row["rank_fraction"] for row in rows.values()])
    )
    skipped = dict(r.skipped)
    assert skipped == {
        "model.layers.0.input_layernorm.weight": "1-D",
        "model.layers.0.mlp.up_proj.bias": "1-D",
    }
    by_module = {row["module"]: row for row in r.by_module().iter_rows(named=True)}
    assert by_module["lm_head"]["mean_rank_fraction"] == rows["lm_head.weight"]["rank_fraction"]
    assert r.by_layer()["layer"].to_list() == [0, 1]


def test_tolerance_overrides_match_pytorch(tmp_path: Path) -> None:
    """Real-valued bf16 updates: the rank depends on the tolerance exactly as PyTorch's."""
    torch.manual_seed(0)
    u = torch.randn(64, 8) @ torch.diag(torch.logspace(0, -4, 8)) @ torch.randn(8, 48)
    base = torch.randn(64, 48).to(torch.bfloat16)
    tuned = (base.float() + u * 0.01).to(torch.bfloat16)
    save_file({"w": base}, tmp_path / "a.safetensors")
    save_file({"w": tuned}, tmp_path / "b.safetensors")
    d = tuned.float() - base.float()
    s = torch.linalg.svdvals(d)
    seen = set()
    for kw in (
        {},
        {"atol": float(s[5])},
        {"rtol": 0.05},
        {"atol": float(s[20]), "rtol": 1e-3},
        {"atol": 0.0},
        {"rtol": 0.0, "atol": 0.0},
    ):
        got = rlmask.rank(
            tmp_path / "a.safetensors",
            tmp_path / "b.safetensors",
            device="cpu",
            progress=False,
            **kw,
        )
        want = int(torch.linalg.matrix_rank(d, **kw))
        assert got.tensors["rank"][0] == want, kw
        seen.add(want)
    assert len(seen) >= 3  # the overrides really change the answer


def test_selection_and_embeddings(tmp_path: Path) -> None:
    a, b, _ = _known_rank_pair(tmp_path)
    r = rlmask.rank(a, b, device="cpu", skip_embeddings=True, progress=False)
    assert "lm_head.weight" not in r.tensors["name"].to_list()
    assert dict(r.skipped)["lm_head.weight"].startswith("embedding")
    r = rlmask.rank(a, b, device="cpu", include=r"mlp\.", exclude="bias", progress=False)
    assert r.tensors["name"].to_list() == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]


def test_rank_cli(tmp_path: Path) -> None:
    a, b, expected = _known_rank_pair(tmp_path)
    res = CliRunner().invoke(cli, ["rank", str(a), str(b), "--format", "json", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert {t["name"]: t["rank"] for t in d["tensors"]} == expected
    assert d["mean_rank_fraction"] == pytest.approx(
        np.mean([t["rank_fraction"] for t in d["tensors"]])
    )
    res = CliRunner().invoke(cli, ["rank", str(a), str(b), "--by", "module"])
    assert res.exit_code == 0 and "mean rank / min(m, n)" in res.stdout and "q_proj" in res.stdout
    res = CliRunner().invoke(cli, ["rank", str(a), str(b), "--device", "nonsense"])
    # A usage error: exit 2, one line naming the device.
    assert res.exit_code == 2 and "unknown device 'nonsense'" in res.stderr
    assert "Traceback" not in res.stderr


def test_rank_figure_shows_every_matrix(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from rlmask.examples import example_path

    base, tuned = example_path("base"), example_path("tuned-seed1")
    report = rlmask.rank(base, tuned, device="cpu", progress=False)
    fig = report.plot()  # rlmask.plot.rank_figure
    a1, a2 = fig.axes
    per = report.by_module()
    assert [p.get_height() for p in a1.patches] == pytest.approx(
        [100 * v for v in per["mean_rank_fraction"].to_list()]
    )
    lines = a2.get_lines()
    assert len(lines) == report.tensors.height
    for line, name in zip(lines, report.tensors["name"], strict=True):
        s = torch.linalg.svdvals(_delta(base, tuned, name).double())
        want = 100 * torch.cumsum(s**2, 0) / (s**2).sum()
        assert line.get_ydata() == pytest.approx(want.numpy(), rel=1e-4)
    assert {t.get_text() for t in a2.get_legend().get_texts()} == set(per["module"])
    png = tmp_path / "rank.png"
    r = CliRunner().invoke(
        cli, ["rank", str(base), str(tuned), "--device", "cpu", "--plot", str(png)]
    )
    assert r.exit_code == 0 and png.stat().st_size > 0, r.stderr


def _delta(base: Path, tuned: Path, name: str) -> torch.Tensor:
    """The float32 update of one tensor, read with the official safetensors library."""

    def load(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    return load(tuned)[name].float() - load(base)[name].float()


def test_rank_pairs_as_diff_does(tmp_path: Path) -> None:
    """One plan for every pass (issue 28): a tuned checkpoint saved from a DDP-wrapped model
    (``module.`` before every name) pairs with its base in rank as in diff, a name map
    applies, and a comparison over nothing is refused instead of printing an empty report."""
    base, tuned, ranks = _known_rank_pair(tmp_path)
    wrapped = {f"module.{n}": t for n, t in load_file(tuned).items()}
    (tmp_path / "ddp").mkdir()
    save_file(wrapped, tmp_path / "ddp" / "model.safetensors")
    plain = rlmask.rank(base, tuned, device="cpu", progress=False)
    r = rlmask.rank(base, tmp_path / "ddp", device="cpu", progress=False)
    assert r.tensors["name"].to_list() == plain.tensors["name"].to_list()
    assert r.tensors["rank"].to_list() == plain.tensors["rank"].to_list()
    assert dict(zip(r.tensors["name"], r.tensors["rank"], strict=True)) == {
        n: k for n, k in ranks.items() if n in r.tensors["name"].to_list()
    }
    assert rlmask.diff(base, tmp_path / "ddp", progress=False).numel > 0  # diff pairs them too
    # A prefix that only a name map reconciles.
    renamed = {f"base_model.model.{n}": t for n, t in load_file(tuned).items()}
    (tmp_path / "peft").mkdir()
    save_file(renamed, tmp_path / "peft" / "model.safetensors")
    with pytest.raises(rlmask.PairingError):
        rlmask.rank(base, tmp_path / "peft", device="cpu", progress=False)
    m = rlmask.rank(
        base, tmp_path / "peft", device="cpu", name_map={"base_model.model.": ""}, progress=False
    )
    assert m.tensors["rank"].to_list() == plain.tensors["rank"].to_list()
    res = CliRunner().invoke(
        cli,
        [
            "rank",
            str(base),
            str(tmp_path / "peft"),
            "--device",
            "cpu",
            "--name-map",
            "base_model.model.=",
        ],
    )
    assert res.exit_code == 0, res.output
    # Nothing two-dimensional to decompose: a one-line refusal, exit 1.
    res = CliRunner().invoke(
        cli, ["rank", str(base), str(tuned), "--device", "cpu", "--include", "norm"]
    )
    assert res.exit_code == 1 and "no 2-D floating update matrix" in res.stderr, res.output
    assert "Traceback" not in res.output
