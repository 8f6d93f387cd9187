"""rlmask.diff against the numpy oracle, on files written by the official safetensors library,
by transformers' save_pretrained, and byte by byte."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rlmask
from oracle import FLOATS, changed, expected_report, load_checkpoint, write_raw

SWEEP = [1e-8, 1e-7, 1e-6, 1e-5, 1e-3]
CHUNK = 1 << 18  # the core's unit of parallel work, in elements

FLOAT_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,  # AMD-trained FP8
    torch.float8_e5m2fnuz,
]
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]


def _pair(
    rng: np.random.Generator, n: int, dtype: torch.dtype, frac: float = 0.3, scale: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """A base tensor and a tuned one where about ``frac`` of the elements moved by ~scale."""
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.05)
    move = torch.from_numpy(rng.random(n) < frac)
    step = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * scale
    tuned = torch.where(move, base + step, base)
    return base.to(dtype), tuned.to(dtype)


def _specials(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-picked pairs: NaN, infinities, signed zeros, subnormals, near-ties."""
    fin = torch.finfo(dtype)
    tiny = fin.smallest_normal
    sub = tiny / 4
    pairs = [
        (0.0, -0.0),
        (-0.0, -0.0),
        (sub, sub),
        (sub, 2 * sub),
        (sub, 0.0),
        (tiny, tiny * 2),
        (1.0, 1.0),
        (1.0, 1.0 + fin.eps),
        (-1.0, 1.0),
        (fin.max, fin.max),
        (fin.max, -fin.max),
    ]
    # E4M3 and the FNUZ formats have no infinities.
    if dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        pairs += [(math.inf, math.inf), (math.inf, -math.inf), (math.inf, 1.0)]
    pairs += [(math.nan, math.nan), (math.nan, 1.0), (1.0, math.nan)]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64).to(dtype)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64).to(dtype)
    return a, b


def _check(
    report: rlmask.DiffReport,
    base: Path | list[Path],
    tuned: Path | list[Path],
    tolerances: list[float],
    criterion: str = "absolute",
) -> None:
    """Every per-tensor count and every total agrees with the oracle."""
    fa = (
        sorted(base.glob("*.safetensors"))
        if isinstance(base, Path) and base.is_dir()
        else (base if isinstance(base, list) else [base])
    )
    fb = (
        sorted(tuned.glob("*.safetensors"))
        if isinstance(tuned, Path) and tuned.is_dir()
        else (tuned if isinstance(tuned, list) else [tuned])
    )
    a, b = load_checkpoint(fa), load_checkpoint(fb)
    want = expected_report(a, b, tolerances, criterion)
    d = report.to_dict()
    got = {t["name"]: t["changed"] for t in d["tensors"]}
    assert got == want
    floating = [n for n in want if a[n][0] in FLOATS]
    numel = sum(a[n][1].size for n in floating)
    assert d["numel"] == numel
    totals = [sum(want[n][k] for n in floating) for k in range(len(tolerances))]
    assert d["changed"] == totals
    assert d["sparsity"] == pytest.approx([1 - c / numel for c in totals], abs=0, rel=1e-15)
    for t in d["tensors"]:
        assert t["numel"] == a[t["name"]][1].size
        assert t["floating"] == (a[t["name"]][0] in FLOATS)


def test_every_dtype_written_by_official_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base, tuned = {}, {}
    for dt in FLOAT_DTYPES:
        x, y = _pair(rng, 1000 + 13, dt)
        s, t = _specials(dt)
        base[f"w.{dt}"] = torch.cat([x, s]).reshape(-1, 1)
        tuned[f"w.{dt}"] = torch.cat([y, t]).reshape(-1, 1)
    for dt in INT_DTYPES:
        x = torch.from_numpy(rng.integers(0, 100, 777)).to(dt)
        y = x.clone()
        y[::7] = ~x[::7] if dt == torch.bool else x[::7] + 1
        base[f"i.{dt}"], tuned[f"i.{dt}"] = x, y
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    report = rlmask.diff(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", tolerances=SWEEP, progress=False
    )
    assert report.tolerances == tuple(SWEEP)
    _check(report, tmp_path / "a.safetensors", tmp_path / "b.safetensors", SWEEP)
    # Integer tensors are listed but kept out of the floating totals.
    ints = report.tensors.filter(~report.tensors["floating"])
    assert sorted(ints["name"]) == sorted(f"i.{dt}" for dt in INT_DTYPES)
    assert all(c > 0 for c in ints["changed"])


@pytest.mark.parametrize("criterion,tol", [("exact", 0.0), ("relative", 1e-2), ("relative", 0.5)])
def test_exact_and_relative_criteria(tmp_path: Path, criterion: str, tol: float) -> None:
    rng = np.random.default_rng(1)
    base, tuned = {}, {}
    for dt in FLOAT_DTYPES:
        x, y = _pair(rng, 4099, dt, scale=1e-2)
        s, t = _specials(dt)
        base[str(dt)], tuned[str(dt)] = torch.cat([x, s]), torch.cat([y, t])
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    kw = {"eta": tol} if criterion == "relative" else {}
    report = rlmask.diff(
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        criterion=criterion,
        progress=False,
        **kw,
    )  # type: ignore[arg-type]
    assert report.tolerances == (tol,)
    _check(report, tmp_path / "a.safetensors", tmp_path / "b.safetensors", [tol], criterion)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 63, 64, 65, 1000, CHUNK - 1, CHUNK, 2 * CHUNK + 77])
def test_sizes_and_chunk_boundaries(tmp_path: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    x, y = _pair(rng, n, torch.bfloat16, frac=0.5)
    save_file(
        {"t": x, "scalar": torch.tensor(1.0), "empty": torch.zeros(0, 3)},
        tmp_path / "a.safetensors",
    )
    save_file(
        {"t": y, "scalar": torch.tensor(2.0), "empty": torch.zeros(0, 3)},
        tmp_path / "b.safetensors",
    )
    report = rlmask.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    _check(report, tmp_path / "a.safetensors", tmp_path / "b.safetensors", [1e-5])
    rows = {r["name"]: r for r in report.tensors.iter_rows(named=True)}
    assert rows["scalar"]["shape"] == [] and rows["scalar"]["changed"] == 1
    assert rows["empty"]["numel"] == 0 and rows["empty"]["sparsity"] == 1.0


def test_odd_alignment_shuffled_data_no_padding(tmp_path: Path) -> None:
    """Files no official writer makes: data at odd offsets, in another order than the header."""
    rng = np.random.default_rng(2)
    specs = []
    arrays = {}
    for name, dtype, np_dt, n in [
        ("a", "U8", np.uint8, 3),
        ("b", "BF16", np.uint16, 1001),
        ("c", "F32", np.float32, 333),
        ("d", "F64", np.float64, 65),
        ("e", "F16", np.float16, 129),
    ]:
        base = (
            (rng.standard_normal(n) * 0.1).astype(np_dt)
            if np_dt != np.uint16
            else rng.integers(0x3C00, 0x3E00, n).astype(np.uint16)
        )
        tuned = base.copy()
        tuned[::3] = (tuned[::3] + 1) if np_dt in (np.uint8, np.uint16) else tuned[::3] * 1.01
        arrays[name] = (dtype, base, tuned)
        specs.append(name)
    for side in (0, 1):
        write_raw(
            tmp_path / f"{side}.safetensors",
            [(n, arrays[n][0], [arrays[n][1].size], arrays[n][1 + side].tobytes()) for n in specs],
            data_order=[3, 0, 4, 1, 2],
            metadata={"made": "by hand"},
        )
    report = rlmask.diff(
        tmp_path / "0.safetensors", tmp_path / "1.safetensors", tolerances=SWEEP, progress=False
    )
    got = {t["name"]: t["changed"] for t in report.to_dict()["tensors"]}
    for n in specs:
        dtype, a, b = arrays[n]
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
        want = [int(changed(dtype, a.view(bits), dtype, b.view(bits), tol=t).sum()) for t in SWEEP]
        assert got[n] == want, n


def test_transformers_sharded_llama(tmp_path: Path) -> None:
    """A tiny llama from a config (no download), saved by save_pretrained in several shards,
    finetuned for two real Adam steps in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "tuned", max_shard_size="40KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "base").glob("*.safetensors"))) >= 2

    report = rlmask.diff(tmp_path / "base", tmp_path / "tuned", tolerances=SWEEP, progress=False)
    _check(report, tmp_path / "base", tmp_path / "tuned", SWEEP)
    assert report.numel == sum(p.numel() for p in model.parameters())
    assert 0.0 < report.sparsity < 1.0
    assert report.only_in_base == report.only_in_tuned == report.tied == []


def test_breakdowns_match_oracle(tmp_path: Path) -> None:
    from rlmask.examples import example_path

    base, tuned = example_path("base"), example_path("tuned-seed1")
    report = rlmask.diff(base, tuned, tolerances=[1e-6], progress=False)
    a = load_checkpoint(sorted(base.glob("*.safetensors")))
    b = load_checkpoint(sorted(tuned.glob("*.safetensors")))
    want = expected_report(a, b, [1e-6, 1e-5])
    # by_layer: numel-weighted sparsity and the unweighted mean of per-matrix sparsities.
    layers: dict[int, list[tuple[int, int]]] = {}
    for name, counts in want.items():
        if ".layers." in name:
            layers.setdefault(int(name.split(".")[2]), []).append((counts[1], a[name][1].size))
    by_layer = report.by_layer()
    assert by_layer["layer"].to_list() == sorted(layers)
    for row in by_layer.iter_rows(named=True):
        items = layers[row["layer"]]
        assert row["numel"] == sum(n for _, n in items)
        assert row["changed@1e-05"] == sum(c for c, _ in items)
        assert row["sparsity@1e-05"] == pytest.approx(1 - sum(c for c, _ in items) / row["numel"])
        assert row["sparsity_unweighted_mean"] == pytest.approx(
            np.mean([1 - c / n for c, n in items])
        )
    # by_module: every element lands in exactly one module.
    by_module = report.by_module()
    assert by_module["numel"].sum() == report.numel
    assert by_module["changed@1e-05"].sum() == report.changed
    q = by_module.filter(by_module["module"] == "q_proj").row(0, named=True)
    q_names = [n for n in want if n.endswith("q_proj.weight")]
    assert q["tensors"] == len(q_names)
    assert q["changed@1e-06"] == sum(want[n][0] for n in q_names)
    assert by_module["module"].to_list()[:3] == ["q_proj", "k_proj", "v_proj"]


def test_mixed_dtypes_compared_widened_and_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x, y = _pair(rng, 500, torch.float32, scale=1e-4)
    save_file({"w": x.to(torch.bfloat16)}, tmp_path / "a.safetensors")
    save_file({"w": y}, tmp_path / "b.safetensors")
    report = rlmask.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    _check(report, tmp_path / "a.safetensors", tmp_path / "b.safetensors", [1e-5])
    assert report.dtype_mismatches == ["w"]
    assert report.to_dict()["tensors"][0]["tuned_dtype"] == "F32"
    assert "dtypes differ" in report.summary()


def test_only_in_one_side_and_tied(tmp_path: Path) -> None:
    emb, w = torch.zeros(4, 2), torch.zeros(64)
    save_file(
        {
            "model.embed_tokens.weight": emb,
            "lm_head.weight": emb.clone(),
            "extra": emb.clone(),
            "w": w,
        },
        tmp_path / "a.safetensors",
    )
    save_file(
        {"model.embed_tokens.weight": emb, "new": emb.clone(), "w": w.clone()},
        tmp_path / "b.safetensors",
    )
    report = rlmask.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    # A head missing on one side only is not "tied": the other side has its own.
    assert report.only_in_base == ["extra", "lm_head.weight"]
    assert report.only_in_tuned == ["new"]
    assert report.tied == []
    assert report.tensors["name"].to_list() == ["model.embed_tokens.weight", "w"]
    # Tied: both sides store the embeddings and neither an lm_head.
    save_file({"model.embed_tokens.weight": emb, "w": w}, tmp_path / "c.safetensors")
    report = rlmask.diff(tmp_path / "c.safetensors", tmp_path / "b.safetensors", progress=False)
    assert report.tied == ["lm_head.weight"] and report.only_in_base == []


def test_shape_mismatch_errors_or_skips(tmp_path: Path) -> None:
    save_file(
        {"model.embed_tokens.weight": torch.zeros(4, 2), "w": torch.zeros(3)},
        tmp_path / "a.safetensors",
    )
    save_file(
        {"model.embed_tokens.weight": torch.zeros(5, 2), "w": torch.ones(3)},
        tmp_path / "b.safetensors",
    )
    with pytest.raises(rlmask.TensorMismatchError) as e:
        rlmask.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and "[4, 2]" in msg and "[5, 2]" in msg
    assert "a.safetensors" in msg and "b.safetensors" in msg
    report = rlmask.diff(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", skip_mismatched=True, progress=False
    )
    assert [n for n, _ in report.skipped] == ["model.embed_tokens.weight"]
    assert report.tensors["name"].to_list() == ["w"]
    assert report.changed == 3


def test_float_against_integer_is_a_mismatch(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(3, dtype=torch.int32)}, tmp_path / "b.safetensors")
    with pytest.raises(rlmask.TensorMismatchError, match="F32.*I32"):
        rlmask.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)


def test_include_exclude(tmp_path: Path) -> None:
    t = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(2) for i in range(3)}
    t["model.norm.weight"] = torch.zeros(2)
    save_file(t, tmp_path / "a.safetensors")
    save_file({k: v + 1 for k, v in t.items()}, tmp_path / "b.safetensors")
    r = rlmask.diff(
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        include=r"mlp\.",
        exclude=[r"layers\.1\."],
        progress=False,
    )
    assert r.tensors["name"].to_list() == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
    ]
    with pytest.raises(ValueError, match="invalid include regex"):
        rlmask.diff(
            tmp_path / "a.safetensors", tmp_path / "b.safetensors", include="(", progress=False
        )


def test_argument_errors(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3)}, tmp_path / "a.safetensors")
    p = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="needs eta"):
        rlmask.diff(p, p, criterion="relative", progress=False)
    with pytest.raises(ValueError, match="unknown criterion"):
        rlmask.diff(p, p, criterion="fuzzy", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        rlmask.diff(p, p, tol=-1.0, progress=False)
    with pytest.raises(ValueError, match="absolute criterion"):
        rlmask.diff(p, p, criterion="exact", tolerances=[1e-3], progress=False)


def test_json_contract(tmp_path: Path) -> None:
    """The DESIGN §4 object: every key, with its type."""
    import json

    from rlmask.examples import example_path

    r = rlmask.diff(
        example_path("base"),
        example_path("tuned-seed2"),
        tolerances=rlmask.DEFAULT_SWEEP,
        progress=False,
    )
    text = r.to_json()
    d = json.loads(text)
    assert d == r.to_dict() == json.loads(r.to_json(indent=2))
    # One record per line: each tensor's row is a line of its own, and parses alone.
    rows = [json.loads(line.rstrip(",")) for line in text.splitlines() if '"name"' in line]
    assert rows == d["tensors"] and len(rows) > 1
    assert d["criterion"] == "absolute" and d["tolerances"] == [1e-8, 1e-7, 1e-6, 1e-5]
    assert isinstance(d["base"], str) and isinstance(d["tuned"], str)
    assert isinstance(d["numel"], int)
    assert len(d["changed"]) == len(d["sparsity"]) == 4
    assert all(0.0 <= s <= 1.0 for s in d["sparsity"])
    assert d["only_in_base"] == d["only_in_tuned"] == d["tied"] == []
    for t in d["tensors"]:
        assert set(t) >= {"name", "dtype", "shape", "numel", "changed", "sparsity"}
        assert len(t["changed"]) == 4 and t["numel"] == math.prod(t["shape"])
    assert sum(t["numel"] for t in d["tensors"]) == d["numel"]


def test_resized_vocabulary_compares_the_shared_rows(tmp_path: Path) -> None:
    """A vocabulary grown between base and tuned (the paper's own notebook lost embed_tokens
    and lm_head this way): refused by default with a hint; with shared_rows, compared on the
    rows both share, the extra rows listed; rank treats it the same way."""
    import json

    from click.testing import CliRunner

    from rlmask.cli import cli

    rng = np.random.default_rng(3)
    rows, extra, width = 40, 3, 16
    base = {
        "model.embed_tokens.weight": torch.randn(rows, width),
        "lm_head.weight": torch.randn(rows, width),
        "model.layers.0.mlp.up_proj.weight": torch.randn(width, width),
    }
    tuned = {}
    for n, t in base.items():
        moved = t + torch.from_numpy(rng.random(t.shape) < 0.2) * 0.5
        if n != "model.layers.0.mlp.up_proj.weight":
            moved = torch.cat([moved, torch.randn(extra, width)])
        tuned[n] = moved
    for side, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / side).mkdir()
        save_file(
            {k: v.bfloat16() for k, v in tensors.items()},
            tmp_path / side / "model.safetensors",
        )
    a = load_checkpoint([tmp_path / "base" / "model.safetensors"])
    b = load_checkpoint([tmp_path / "tuned" / "model.safetensors"])

    with pytest.raises(rlmask.TensorMismatchError, match="--compare-shared-rows") as e:
        rlmask.diff(tmp_path / "base", tmp_path / "tuned", progress=False)
    assert e.value.tensor == "lm_head.weight"

    r = rlmask.diff(
        tmp_path / "base", tmp_path / "tuned", shared_rows=True, mask=True, progress=False
    )
    assert r.resized == [
        ("lm_head.weight", rows, rows + extra),
        ("model.embed_tokens.weight", rows, rows + extra),
    ]
    want = {}
    for n in base:
        (da, xa), (db, xb) = a[n], b[n]
        k = xa.size
        want[n] = changed(da, xa, db, xb[:k]).reshape(base[n].shape)
    got = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    for n, w in want.items():
        assert got[n]["changed"] == w.sum() and got[n]["numel"] == w.size
        assert list(got[n]["shape"]) == list(w.shape)
        assert r.mask is not None
        np.testing.assert_array_equal(r.mask[n], w)
    assert "rows both share" in r.summary() and f"({rows} -> {rows + extra})" in r.summary()
    out = CliRunner().invoke(
        cli,
        ["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--format", "json"],
    )
    assert out.exit_code == 1 and "--compare-shared-rows" in out.stderr
    out = CliRunner().invoke(
        cli,
        [
            "diff",
            str(tmp_path / "base"),
            str(tmp_path / "tuned"),
            "--compare-shared-rows",
            "--format",
            "json",
        ],
    )
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["changed"] == [sum(int(w.sum()) for w in want.values())]
    assert {d["name"]: (d["base_rows"], d["tuned_rows"]) for d in report["resized"]} == {
        "lm_head.weight": (rows, rows + extra),
        "model.embed_tokens.weight": (rows, rows + extra),
    }

    # rank: the same refusal, skip, and shared rows.
    with pytest.raises(rlmask.TensorMismatchError, match="shape"):
        rlmask.rank(tmp_path / "base", tmp_path / "tuned", device="cpu", progress=False)
    skipped = rlmask.rank(
        tmp_path / "base", tmp_path / "tuned", device="cpu", skip_mismatched=True, progress=False
    )
    assert {n for n, _ in skipped.skipped} >= {"lm_head.weight", "model.embed_tokens.weight"}
    assert skipped.tensors["name"].to_list() == ["model.layers.0.mlp.up_proj.weight"]
    shared = rlmask.rank(
        tmp_path / "base", tmp_path / "tuned", device="cpu", shared_rows=True, progress=False
    )
    ranks = dict(zip(shared.tensors["name"], shared.tensors["rank"], strict=True))
    for n in ("lm_head.weight", "model.embed_tokens.weight"):
        (da, xa), (db, xb) = a[n], b[n]
        delta = torch.from_numpy(values_f32(db, xb[: xa.size]) - values_f32(da, xa)).reshape(
            rows, width
        )
        assert ranks[n] == int(torch.linalg.matrix_rank(delta.double()))
    assert shared.resized == r.resized


def values_f32(dtype: str, bits: np.ndarray) -> np.ndarray:
    from oracle import values

    return values(dtype, bits).astype(np.float32)
