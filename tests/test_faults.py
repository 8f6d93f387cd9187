"""Issue 25: what a new user and a fault campaign still hit. Each test builds its fault's input
itself and checks the outcome from the outside (exit code, one line, files untouched)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rlmask
from rlmask.cli import cli
from rlmask.examples import example_path

FINDING1 = Path(example_path("base")).parent.parent / "finding1"
RLMASK = [sys.executable, "-m", "rlmask"]


def run(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the Finding 1 base and an RL checkpoint, each a folder with a config."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    shutil.copytree(FINDING1 / "base", base)
    shutil.copytree(FINDING1 / "rl-seed1", tuned)
    for d in (base, tuned):
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return base, tuned


# ---------------------------------------------------------------------------------------
# Tables render as lines


def _assert_lines(text: str, header: str) -> None:
    assert "\\n" not in text, text[:300]
    assert any(line.split() == header.split() for line in text.splitlines()), text[:500]


def test_every_table_renders_as_lines(tmp_path: Path) -> None:
    code, out, _ = run("trajectory", FINDING1 / "base", FINDING1 / "run-seed1", "-q")
    assert code == 0
    _assert_lines(out, "checkpoint step sparsity_vs_base sparsity_consecutive outside_final path")
    report = rlmask.trajectory(FINDING1 / "base", FINDING1 / "run-seed1", progress=False)
    _assert_lines(
        repr(report), "checkpoint step sparsity_vs_base sparsity_consecutive outside_final path"
    )
    masks = []
    for side in ("rl-seed1", "rl-seed2", "sft"):
        m = tmp_path / f"{side}.rlmask"
        rlmask.diff(FINDING1 / "base", FINDING1 / side, save_mask=m, progress=False)
        masks.append(m)
    code, out, _ = run("overlap", *masks)
    assert code == 0
    _assert_lines(out, "mask 1 2 3")
    # Three matrices (o1, Jaccard, lift), each a table of its own.
    assert sum(line.split() == ["mask", "1", "2", "3"] for line in out.splitlines()) == 3
    text = repr(rlmask.overlap_matrix(masks))
    assert "\\n" not in text and sum(set(line) == {"-", " "} for line in text.splitlines()) == 3
    for by in ("module", "layer"):
        code, out, _ = run("diff", FINDING1 / "base", FINDING1 / "sft", "--by", by, "-q")
        assert code == 0 and "\\n" not in out and f"by {by}:" in out.splitlines()
    code, out, _ = run("mask", "info", masks[0])
    assert code == 0 and "\\n" not in out
    # A hostile name is still escaped inside a table's cell.
    save_file({"a\nb": torch.ones(4)}, tmp_path / "x.safetensors")
    save_file({"a\nb": torch.zeros(4)}, tmp_path / "y.safetensors")
    code, out, _ = run(
        "diff", tmp_path / "x.safetensors", tmp_path / "y.safetensors", "--by", "tensor", "-q"
    )
    assert code == 0 and "a\\nb" in out and "a\nb" not in out


# ---------------------------------------------------------------------------------------
# A survey never hangs


def _manifest(tmp_path: Path, pairs: int = 2) -> Path:
    m = tmp_path / "survey.toml"
    m.write_text(
        "".join(
            f'[[pair]]\nname = "p{i}"\nbase = "{FINDING1 / "base"}"\n'
            f'tuned = "{FINDING1 / ("rl-seed1", "rl-seed2", "sft")[i % 3]}"\n'
            for i in range(pairs)
        )
    )
    return m


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_survey_with_an_unwritable_cache_fails_before_any_pass(tmp_path: Path, jobs: str) -> None:
    (tmp_path / "a-file").write_text("")
    r = subprocess.run(
        [
            *RLMASK,
            "survey",
            _manifest(tmp_path),
            "--cache",
            tmp_path / "a-file" / "cache",
            "--jobs",
            jobs,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--cache DIR" in r.stderr and "--no-cache" in r.stderr
    assert " ok" not in r.stderr  # no pair ran


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_survey_that_fails_while_pairs_run_ends(tmp_path: Path, jobs: int) -> None:
    """Writing a result fails after the first pair: the error reaches the caller and every
    worker is stopped (this hung forever, or raised 'cannot join current thread')."""
    script = f"""
import rlmask._survey as s
from rlmask.errors import OutputError
def fail(*a, **k):
    raise OutputError("disk gone", "x")
s.write_text_atomic = fail
try:
    s.survey({str(_manifest(tmp_path, 6))!r}, jobs={jobs}, cache={str(tmp_path / "c")!r})
except OutputError as e:
    print("raised:", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "raised: disk gone" in r.stdout, r.stderr
    assert "cannot join" not in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------
# An output that is an input is refused


def test_outputs_that_are_inputs_are_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    shard, tshard = base / "model.safetensors", tuned / "model.safetensors"
    patch = tmp_path / "x.rlpatch"
    assert run("patch", "create", base, tuned, "-o", patch, "-q")[0] == 0
    trl = tmp_path / "x.trl"
    assert run("patch", "convert", patch, "--to", "trl", "-o", trl)[0] == 0
    m = tmp_path / "m.rlmask"
    rlmask.diff(base, tuned, save_mask=m, progress=False)
    os.link(shard, tmp_path / "hardlink.safetensors")
    (tmp_path / "symlink.json").symlink_to(shard)
    before = {p: sha(p) for p in (shard, tshard, patch, trl, m)}
    cases = [
        ["patch", "create", base, tuned, "-o", shard],
        ["diff", base, tuned, "--save-mask", tshard],
        ["diff", base, tuned, "-o", shard],
        ["diff", base, tuned, "-o", tmp_path / "symlink.json"],
        ["diff", base, tuned, "-o", tmp_path / "hardlink.safetensors"],
        ["diff", shard, tshard, "--plot", tmp_path / "hardlink.safetensors"],
        ["patch", "convert", trl, "--to", "rlmask", "--base", base, "-o", shard],
        ["patch", "convert", patch, "--to", "trl", "-o", patch],
        ["patch", "apply", base, patch, "-o", base / "out"],
        ["patch", "info", patch, "--format", "json", "-o", patch],
        ["mask", "combine", "--op", "or", "-o", m, m, m],
        ["overlap", m, m, "-o", m],
        ["trajectory", base, tuned, "-o", tuned / "report.json"],
        ["rank", base, tuned, "-o", shard],
    ]
    for args in cases:
        code, out, err = run(*args)
        assert code == 2, (args, out, err)
        assert "input" in err and "Traceback" not in err, (args, err)
    assert {p: sha(p) for p in before} == before
    assert sorted(os.listdir(base)) == ["config.json", "model.safetensors"]
    survey = _manifest(tmp_path)
    code, _, err = run("survey", survey, "-o", survey)
    assert code == 2 and "is the input" in err
    # The API refuses too (an OutputError), before anything is read or written.
    with pytest.raises(rlmask.OutputError, match="input"):
        rlmask.diff(base, tuned, save_mask=tshard, progress=False)
    from rlmask import patch as patches

    with pytest.raises(rlmask.OutputError, match="input"):
        patches.apply(base, [patch], base / "out", progress=False)
    assert sha(tshard) == before[tshard] and not (base / "out").exists()
    # An output beside the inputs is fine.
    assert run("diff", base, tuned, "-o", tmp_path / "r.json", "--format", "json")[0] == 0


# ---------------------------------------------------------------------------------------
# Side files: only regular, bounded, never a hang


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_config_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], kind: str
) -> None:
    base, tuned = pair
    config = base / "config.json"
    config.unlink()
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "dev-zero":
        config.symlink_to("/dev/zero")
    else:
        config.mkdir()
    for cmd in (["diff", base, tuned], ["trajectory", base, tuned]):
        r = subprocess.run(
            [*RLMASK, *map(str, cmd), "-q"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1, r.stderr
        assert "config.json" in r.stderr and "not a regular file" in r.stderr
        assert "Traceback" not in r.stderr


def test_block_sizes_and_configs_that_cannot_be_read(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    base, tuned = pair
    for bad in ("[-1, 128]", "[1e400, 128]", "[99999999999999999999, 1]", "[0, 4]", '["128", 128]'):
        config = '{"quantization_config": {"weight_block_size": ' + bad + "}}"
        (base / "config.json").write_text(config)
        code, _, err = run("diff", base, tuned, "-q")
        assert code == 1 and "weight_block_size" in err and "config.json" in err, err
        with pytest.raises(rlmask.CheckpointFormatError):
            rlmask.diff(base, tuned, progress=False)
    # Nested past Python's recursion limit: read as "no block size", not a RecursionError.
    (base / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    assert run("diff", base, tuned, "-q")[0] == 0
    for flag in ("99999999999999999999x1", "0x4", "-1x4", "١٢٨x128"):
        code, _, err = run("diff", base, tuned, "--block-size", flag, "-q")
        assert code == 2 and "--block-size" in err and "Traceback" not in err, (flag, err)
    with pytest.raises(ValueError, match="block_size"):
        rlmask.diff(base, tuned, block_size=(2**70, 1), progress=False)


# ---------------------------------------------------------------------------------------
# The survey's cache: every input in the key, damaged entries recomputed


def test_survey_cache_key_holds_the_fp8_block_size(tmp_path: Path) -> None:
    from test_fp8 import _fixture

    base, tuned, _ = _fixture(tmp_path, np.random.default_rng(7))
    m = tmp_path / "s.toml"
    m.write_text(f'[[pair]]\nname = "fp8"\nbase = "{base}"\ntuned = "{tuned}"\n')
    first = rlmask.survey(m)
    assert first.tensors["status"].to_list() == ["ok"]
    assert rlmask.survey(m).tensors["status"].to_list() == ["cached"]
    # Another block size that the same scale grids fit (3 x 2 blocks of a 37 x 50 weight).
    for side in (base, tuned):
        config = json.loads((side / "config.json").read_text())
        config["quantization_config"]["weight_block_size"] = [13, 25]
        (side / "config.json").write_text(json.dumps(config))
    again = rlmask.survey(m)
    fresh = rlmask.diff(base, tuned, progress=False)
    assert again.tensors["status"].to_list() == ["ok"]
    assert again.tensors["changed"].to_list() == [fresh.changed]
    assert fresh.changed != first.tensors["changed"][0]


def test_damaged_cache_entries_are_recomputed(tmp_path: Path) -> None:
    m = _manifest(tmp_path, 1)
    good = rlmask.survey(m).tensors["changed"].to_list()
    (entry,) = (tmp_path / "survey.toml.cache").glob("*.json")
    data = json.loads(entry.read_text())
    forged = json.loads(json.dumps(data))
    forged["report"]["changed"] = [0]
    forged["report"]["sparsity"] = [1.0]
    variants = {
        "truncated": entry.read_text()[:40],
        "not json": "\x00\xff garbage",
        "null": "null",
        "a list": "[1, 2]",
        "wrong types": json.dumps({**data, "report": {**data["report"], "changed": "x"}}),
        "missing keys": json.dumps({"version": 1, "key": data["key"]}),
        "forged": json.dumps(forged),
        "other key": json.dumps({**data, "key": "0" * 64}),
        "empty": "",
    }
    for what, text in variants.items():
        entry.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.warns(rlmask.RlmaskWarning, match="damaged survey cache entry"):
            report = rlmask.survey(m)
        assert report.tensors["status"].to_list() == ["ok"], what
        assert report.tensors["changed"].to_list() == good, what
        assert json.loads(entry.read_text()) == data, what  # rewritten whole
    entry.write_text("{")
    r = subprocess.run([*RLMASK, "survey", str(m)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "rlmask: warning:" in r.stderr and "damaged" in r.stderr
    assert "Traceback" not in r.stderr and "UserWarning" not in r.stderr


def test_manifests_that_are_not_manifests(tmp_path: Path) -> None:
    b, t = FINDING1 / "base", FINDING1 / "rl-seed1"
    cases = {
        "group.toml": (
            f'[[pair]]\nname = "a"\nbase = "{b}"\ntuned = "{t}"\ngroup = 3\n',
            "'group' must be text",
        ),
        "deep.toml": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        "pairs.toml": ("pair = [1, 2]\n", "array of tables"),
        "wide.csv": (f"name,base,tuned\n{'a' * 200_000},{b},{t}\n", "not valid CSV"),
        "twice.csv": (f"name,base,tuned,base\na,{b},{t},{t}\n", "'base' is repeated"),
        "fields.csv": (f"name,base,tuned\na,{b},{t},extra\n", "4 fields"),
        "latin1.csv": (None, "not UTF-8"),
    }
    for name, (text, message) in cases.items():
        p = tmp_path / name
        if text is None:
            p.write_bytes(b"name,base,tuned\n\xe9,x,y\n")
        else:
            p.write_text(text)
        code, _, err = run("survey", p, "--no-cache")
        assert code == 2 and message in err and "Traceback" not in err, (name, err)
    bom = tmp_path / "bom.csv"
    bom.write_text(f"\ufeffname,base,tuned,group\na,{b},{t},rl\n", encoding="utf-8")
    code, out, err = run("survey", bom, "--no-cache")
    assert code == 0 and "rl" in out, err


def test_step_numbers_past_64_bits(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for i, name in enumerate(("checkpoint-25", "step_99999999999999999999")):
        shutil.copytree(
            FINDING1 / "run-seed1" / ("checkpoint-25", "checkpoint-50")[i], run_dir / name
        )
    code, out, err = run("trajectory", FINDING1 / "base", run_dir, "--format", "json", "-q")
    assert code == 0, err
    steps = [c["step"] for c in json.loads(out)["checkpoints"]]
    assert None in steps


# ---------------------------------------------------------------------------------------
# Patches: what apply copies, permissions, counts, shapes


def test_apply_copies_model_files_only_and_keeps_permissions(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    base, tuned = pair
    keep = [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ]
    drop = [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
    ]
    for name in keep + drop:
        (base / name).write_text(name)
    os.chmod(base / "model.safetensors", 0o600)
    os.chmod(base / "tokenizer.json", 0o640)
    patch = tmp_path / "p.rlpatch"
    assert run("patch", "create", base, tuned, "-o", patch, "-q")[0] == 0
    assert run("patch", "apply", base, patch, "-o", tmp_path / "out", "-q")[0] == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *keep])
    mode = stat.S_IMODE
    assert mode((out / "model.safetensors").stat().st_mode) == 0o600
    assert mode((out / "tokenizer.json").stat().st_mode) == 0o640
    rebuilt, want = load_file(out / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert rebuilt.keys() == want.keys()
    assert all(torch.equal(rebuilt[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)
    # patch convert writes files as any other output (umask), not 0600.
    umask = os.umask(0o022)
    try:
        assert run("patch", "convert", patch, "--to", "trl", "-o", tmp_path / "t.st")[0] == 0
    finally:
        os.umask(umask)
    assert mode((tmp_path / "t.st").stat().st_mode) == 0o644


def _rewrite(src: Path, dst: Path, edit: object) -> None:
    """A copy of the patch ``src`` with its ``tensors`` description changed by ``edit``."""
    with safe_open(str(src), "pt") as h:
        meta = dict(h.metadata())
    entries = json.loads(meta["tensors"])
    edit(entries)  # type: ignore[operator]
    meta["tensors"] = json.dumps(entries)
    save_file(load_file(src), dst, metadata=meta)


def test_dense_counts_are_checked_and_huge_shapes_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8).bfloat16()
    save_file({"w": w, "v": w.clone()}, a / "model.safetensors")
    save_file({"w": w + 1, "v": w}, b / "model.safetensors")  # every element: stored whole
    p = tmp_path / "p.rlpatch"
    info = rlmask.patch.create(a, b, p, codec="plain", progress=False)
    entry = info.to_dict()["tensors"][[t["name"] for t in info.to_dict()["tensors"]].index("w")]
    assert entry["form"] == "dense" and entry["changed"] == int((w + 1 != w).sum())

    def lie(entries: dict) -> None:
        entries["w"]["changed"] = 3

    forged = tmp_path / "lie.rlpatch"
    _rewrite(p, forged, lie)
    code, _, err = run("patch", "verify", a, forged, "-q")
    assert code == 1 and "said to change 3 elements" in err and "'w'" in err, err
    assert run("patch", "apply", a, forged, "-o", tmp_path / "o", "-q")[0] == 1
    assert not (tmp_path / "o").exists()

    def huge(entries: dict) -> None:
        entries["v"]["shape"] = [2**40, 2**40]

    forged = tmp_path / "huge.rlpatch"
    _rewrite(p, forged, huge)
    code, _, err = run("patch", "info", forged)
    assert code == 1 and "larger than any tensor" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------
# Implausible results get a remark; --as-dtype bf16 against an oracle


def _json(*args: object) -> dict:
    code, out, err = run(*args, "--format", "json", "-q")
    assert code == 0, err
    return json.loads(out)


def test_implausible_results_are_remarked(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    # The same checkpoint twice.
    (w,) = _json("diff", base, base)["warnings"]
    assert "no element changed" in w
    code, out, _ = run("diff", base, base, "--criterion", "exact", "-q")
    assert "warning: no element changed: TUNED is bit-identical to BASE" in out.splitlines()[-1]
    # A real RL finetune: no remark.
    assert _json("diff", base, tuned)["warnings"] == []
    # Unrelated models of the same shapes (another initialisation, bf16).
    g = torch.Generator().manual_seed(3)
    other = {
        k: torch.randn(v.shape, generator=g).bfloat16()
        for k, v in load_file(base / "model.safetensors").items()
    }
    (tmp_path / "other").mkdir()
    save_file(other, tmp_path / "other" / "model.safetensors")
    (w,) = _json("diff", base, tmp_path / "other")["warnings"]
    assert "unrelated models" in w
    # One shard of a sharded checkpoint.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(other)
    halves = {
        "model-00001-of-00002.safetensors": names[:3],
        "model-00002-of-00002.safetensors": names[3:],
    }
    for shard, keys in halves.items():
        save_file({k: other[k] for k in keys}, sharded / shard)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: s for s, keys in halves.items() for k in keys}})
    )
    one = sharded / "model-00001-of-00002.safetensors"
    code, out, _ = run("diff", one, one, "-q")
    assert code == 0 and "TUNED is one of the 2 shards" in out and "BASE is one of" in out
    assert "not compared; pass the folder" in out


def test_as_dtype_bf16_against_torch_rounding(tmp_path: Path) -> None:
    """fp32 checkpoints against a bf16 base: every fp32 weight moved, but rounded to bf16 (as
    an engine loading bf16 sees it, torch's round-to-nearest-even as the oracle) only some."""
    rng = np.random.default_rng(5)
    base = torch.from_numpy(rng.standard_normal((64, 96)).astype(np.float32)).bfloat16()
    step = torch.from_numpy(rng.standard_normal((64, 96)).astype(np.float32))
    tuned32 = base.float() + step * 2e-3 * base.float().abs()  # some cross a rounding boundary
    tuned32[0, :8] = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3895e38, 1e-40, -1e-45]
    )
    half = torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float16))
    half_tuned = half + torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float16)) * 1e-2
    dbl = torch.from_numpy(rng.standard_normal(50))
    for name, tensors in (
        ("a", {"w": base, "h": half.bfloat16(), "d": dbl.bfloat16()}),
        ("b", {"w": tuned32, "h": half_tuned, "d": dbl + 1e-3}),
    ):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    oracle = {
        "w": (base.view(torch.int16) != tuned32.bfloat16().view(torch.int16)),
        "h": (half.bfloat16().view(torch.int16) != half_tuned.bfloat16().view(torch.int16)),
        "d": (
            dbl.bfloat16().view(torch.int16) != (dbl + 1e-3).float().bfloat16().view(torch.int16)
        ),
    }
    report = rlmask.diff(
        tmp_path / "a", tmp_path / "b", criterion="exact", as_dtype="bf16", progress=False
    )
    got = dict(zip(report.tensors["name"], report.tensors["changed"], strict=True))
    assert got == {k: int(v.sum()) for k, v in oracle.items()}
    assert 0 < got["w"] < base.numel() and report.warnings == []
    # The mask of the same pass is the oracle's, element for element.
    m = rlmask.diff(
        tmp_path / "a",
        tmp_path / "b",
        criterion="exact",
        as_dtype="bf16",
        mask=True,
        progress=False,
    ).mask
    assert m is not None
    bits = np.unpackbits(m.packed("w"), bitorder="little")[: base.numel()].astype(bool)
    assert np.array_equal(bits, oracle["w"].numpy().reshape(-1))
    # Without it: nearly every fp32 weight changed, and the report says why.
    plain = _json("diff", tmp_path / "a", tmp_path / "b", "--criterion", "exact")
    assert plain["changed"][0] > got["w"] and plain["as_dtype"] is None
    assert "--as-dtype bf16" in plain["warnings"][0]
    d = _json("diff", tmp_path / "a", tmp_path / "b", "--criterion", "exact", "--as-dtype", "bf16")
    assert d["as_dtype"] == "bf16" and d["changed"] == [sum(got.values())]
    with pytest.raises(ValueError, match="as_dtype"):
        rlmask.diff(tmp_path / "a", tmp_path / "b", as_dtype="fp8", progress=False)


# ---------------------------------------------------------------------------------------
# Errors that point to the right command


def test_errors_point_to_the_right_command(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    code, _, err = run("diff", base, FINDING1 / "run-seed1", "-q")
    assert code == 1 and "rlmask trajectory BASE" in err and "checkpoint-100" in err
    assert err.index("checkpoint-25") < err.index("checkpoint-100")  # in the run's order
    code, _, err = run("diff", base / "config.json", tuned, "-q")
    assert code == 1 and "configuration, not its weights" in err
    for args in ([base, tuned], [base / "model.safetensors", tuned / "model.safetensors"]):
        code, _, err = run("overlap", *args)
        assert code == 1 and "--save-mask" in err, err
    code, _, err = run("overlap", FINDING1 / "base" / "model.safetensors", base)
    assert code == 1 and "--save-mask" in err


# ---------------------------------------------------------------------------------------
# Notebooks and figures


def test_figures_are_returned_once_and_legends_keep_their_colours(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    plt.close("all")
    report = rlmask.diff(FINDING1 / "base", FINDING1 / "sft", magnitude=True, progress=False)
    figures = [report.plot(), report.plot(kind="magnitude")]
    m = tmp_path / "s.toml"
    m.write_text(
        "".join(
            f'[[pair]]\nname = "{n}"\nbase = "{FINDING1 / "base"}"\ntuned = "{FINDING1 / n}"\n'
            f'group = "{g}"\n'
            for n, g in (("rl-seed1", "RL"), ("rl-seed2", "RL"), ("sft", "SFT"))
        )
    )
    survey = rlmask.survey(m, cache="")
    figures.append(survey.plot())
    # Nothing left open in pyplot: Jupyter's inline backend would draw each figure a second
    # time at the end of the cell; the returned Figure is still whole and can be saved.
    assert plt.get_fignums() == []
    for i, fig in enumerate(figures):
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 0
    legend = figures[2].axes[0].get_legend()
    colours = {
        t.get_text(): to_rgba(h.get_facecolor())
        for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }
    bars = {b.get_x(): to_rgba(b.get_facecolor()) for b in figures[2].axes[0].patches}
    assert set(colours) == {"RL", "SFT"} and colours["RL"] != colours["SFT"]
    assert set(bars.values()) == set(colours.values())
    # Axes the caller passed stay the caller's.
    fig, ax = plt.subplots()
    from rlmask.plot import sparsity_by_layer

    sparsity_by_layer(report, ax=ax)
    assert plt.get_fignums() == [fig.number]
    plt.close("all")


def test_two_masks_plot_per_module_against_chance(tmp_path: Path) -> None:
    masks = []
    for side in ("rl-seed1", "rl-seed2"):
        masks.append(tmp_path / f"{side}.rlmask")
        rlmask.diff(FINDING1 / "base", FINDING1 / side, save_mask=masks[-1], progress=False)
    png = tmp_path / "o.png"
    code, _, err = run("overlap", *masks, "--base", FINDING1 / "base", "--plot", png)
    assert code == 0 and png.stat().st_size > 0, err
    from rlmask.plot import overlap_figure

    fig = overlap_figure(rlmask.overlap(*masks, base=FINDING1 / "base"))
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert any("matched" in x for x in labels) and any(
        "random" in x or "chance" in x for x in labels
    ), labels


def test_mask_handles_read_in_one_line_and_take_paths(tmp_path: Path) -> None:
    from rlmask.torch import attach_mask

    lin = torch.nn.Linear(300, 300, bias=False)
    m = rlmask.Mask.from_dict({"weight": np.random.default_rng(0).random((300, 300)) < 0.25})
    m.save(tmp_path / "m.rlmask")
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    handle = attach_mask(lin, tmp_path / "m.rlmask", opt)
    text = repr(handle)
    assert "\n" not in text and len(text) < 200, text
    expected = int(m.counts()["weight"])
    assert f"{expected:,} of 90,000 elements trainable" in text
    before = lin.weight.detach().clone()
    lin(torch.randn(4, 300)).sum().backward()
    opt.step()
    moved = (lin.weight.detach() != before).numpy()
    keep = np.unpackbits(m.packed("weight"), bitorder="little")[:90_000].reshape(300, 300)
    assert not moved[keep == 0].any() and moved[keep == 1].any()
    handle.remove()
    assert "removed" in repr(handle)


def test_mismatched_masks_are_cut_short_and_name_their_bases(tmp_path: Path) -> None:
    a = {f"w{i}": np.zeros((4, 8), bool) for i in range(40)}
    b = {f"w{i}": np.zeros((8, 4), bool) for i in range(40)}
    ma = rlmask.Mask.from_dict(a, {"base": "model-A", "tuned": "a1"})
    mb = rlmask.Mask.from_dict(b, {"base": "model-B", "tuned": "b1"})
    with pytest.raises(rlmask.MaskError) as e:
        rlmask.overlap(ma, mb)
    text = str(e.value)
    assert "40 tensors differ in shape" in text and "(40 in all)" in text
    assert len(text) < 600 and "different models" in text and "model-A" in text


# ---------------------------------------------------------------------------------------
# Smaller: what a table, a help text and an option should say


def test_smaller_command_line_items(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    code, out, _ = run("patch", "--help")
    assert code == 0 and "convert" in out.split("Commands:")[0]
    code, out, _ = run("diff", base, tuned, "--by", "expert", "-q")
    assert code == 0 and "no tensor belongs to a routed expert" in out
    # Trajectory by module: the model's order, shares as percentages, no path column.
    code, out, _ = run(
        "trajectory", FINDING1 / "base", FINDING1 / "run-seed1", "--by", "module", "-q"
    )
    table = out.split("by module:\n")[1].splitlines()
    assert "path" not in table[0] and "outside_final_share" in table[0]
    modules = list(dict.fromkeys(line.split()[0] for line in table[2:]))
    assert modules[:3] == ["q_proj", "k_proj", "v_proj"], modules
    col = table[0].split().index("outside_final_share")
    assert all(line.split()[col].endswith("%") or line.split()[col] == "-" for line in table[2:])
    # The rank table: its fractions as percentages, like the summary above it.
    code, out, _ = run("rank", base, tuned, "-q")
    table = out.split("by module:\n")[1].splitlines()
    for col in ("mean_rank_fraction", "mean_energy_top1"):
        i = table[0].split().index(col)
        assert all(line.split()[i].endswith("%") for line in table[2:]), (col, out)
    # Units on every figure.
    p = tmp_path / "p.rlpatch"
    assert run("patch", "create", base, tuned, "-o", p, "-q")[0] == 0
    assert "bytes per changed element" in run("patch", "info", p)[1]
    # mask info as JSON and CSV, to a file.
    m = tmp_path / "m.rlmask"
    rlmask.diff(base, tuned, save_mask=m, progress=False)
    code, _, _ = run("mask", "info", m, "--format", "json", "-o", tmp_path / "m.json")
    d = json.loads((tmp_path / "m.json").read_text())
    truth = rlmask.load_mask(m)
    assert code == 0 and d["count"] == truth.count and d["numel"] == truth.numel
    assert sum(r["count"] for r in d["by_tensor"]) == truth.count
    assert d["by_tensor"][0]["shape"] == list(truth.shape(d["by_tensor"][0]["name"]))
    code, out, _ = run("mask", "info", m, "--format", "csv", "--by", "layer")
    assert code == 0 and out.splitlines()[0].startswith("layer,")


def test_survey_takes_name_maps_and_skips_mismatched(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    base, tuned = pair
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    tensors = load_file(tuned / "model.safetensors")
    renamed = {k.replace("model.", "backbone.", 1): v for k, v in tensors.items()}
    renamed["backbone.extra.weight"] = torch.zeros(3)
    save_file(renamed, wrapped / "model.safetensors")
    m = tmp_path / "s.toml"
    m.write_text(f'[[pair]]\nname = "w"\nbase = "{base}"\ntuned = "{wrapped}"\n')
    code, out, err = run(
        "survey", m, "--no-cache", "--name-map", "backbone.=model.", "--format", "json"
    )
    assert code == 0, err
    want = rlmask.diff(base, tuned, progress=False).changed
    assert json.loads(out)["rows"][0]["changed"] == want
    # A tensor of another shape under the same name: failed pair, or skipped with the flag.
    bad = dict(tensors)
    name = next(k for k in bad if k.endswith("q_proj.weight"))
    bad[name] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(bad, wrapped / "model.safetensors")
    m.write_text(f'[[pair]]\nname = "w"\nbase = "{base}"\ntuned = "{wrapped}"\n')
    assert run("survey", m, "--no-cache")[0] == 1
    code, out, err = run("survey", m, "--no-cache", "--skip-mismatched", "--format", "json")
    assert code == 0 and json.loads(out)["pairs"]["w"]["skipped"][0]["name"] == name, err


def test_writers_refuse_what_their_readers_would_refuse(tmp_path: Path) -> None:
    """Checkpoints whose 60 MB header is readable, but whose mask or patch would need a header
    past the 100 MB every safetensors reader accepts (names appear twice there): refused before
    anything is written, not renamed into place and refused on reading."""
    names = [f"model.layers.{i}." + "x" * 100_000 for i in range(600)]
    for side, value in (("a", 0.0), ("b", 1.0)):
        (tmp_path / side).mkdir()
        save_file(
            {n: torch.full((1,), value) for n in names}, tmp_path / side / "model.safetensors"
        )
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = run("diff", a, b, "--save-mask", tmp_path / "m.rlmask", "-q")
    assert code == 1 and "header would be" in err and "nothing was written" in err, err
    code, _, err = run("patch", "create", a, b, "-o", tmp_path / "p.rlpatch", "-q")
    assert code == 1 and "header would be" in err, err
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no file, no temporary left


def test_every_command_table_and_repr_renders_as_lines(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    """No table of any command, and no report's repr, prints a literal backslash-n."""
    base, tuned = pair
    m1, m2 = tmp_path / "1.rlmask", tmp_path / "2.rlmask"
    d = rlmask.diff(base, tuned, save_mask=m1, magnitude=True, progress=False)
    rlmask.diff(base, FINDING1 / "rl-seed2", save_mask=m2, progress=False)
    p = tmp_path / "p.rlpatch"
    survey = _manifest(tmp_path)
    commands = [
        ["diff", base, tuned, "--by", "tensor"],
        ["diff", base, tuned, "--by", "magnitude"],
        ["trajectory", FINDING1 / "base", FINDING1 / "run-seed1", "--by", "layer"],
        ["overlap", m1, m2, "--by", "module"],
        ["overlap", m1, m2, m1],
        ["mask", "info", m1, "--by", "tensor"],
        ["rank", base, tuned],
        ["survey", survey, "--no-cache", "--by", "group"],
        ["patch", "create", base, tuned, "-o", p],
        ["patch", "info", p],
    ]
    for args in commands:
        code, out, err = run(*args, *(["-q"] if args[0] in ("diff", "trajectory", "rank") else []))
        assert code == 0, (args, err)
        assert "\\n" not in out and len(out.splitlines()) > 3, (args, out[:300])
    from rlmask import patch as patches

    reports = [
        d,
        rlmask.trajectory(FINDING1 / "base", FINDING1 / "run-seed1", progress=False),
        rlmask.overlap(m1, m2),
        rlmask.overlap_matrix([m1, m2, m1]),
        rlmask.rank(base, tuned, progress=False),
        rlmask.survey(survey, cache=""),
        patches.load(p),
        rlmask.load_mask(m1),
    ]
    for r in reports:
        for text in (repr(r), str(r)):
            assert "\\n" not in text, (type(r), text[:300])


def test_a_survey_never_writes_into_its_pairs(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    m = tmp_path / "s.toml"
    m.write_text(f'[[pair]]\nname = "a"\nbase = "{base}"\ntuned = "{tuned}"\n')
    shard = base / "model.safetensors"
    before = sha(shard)
    for args in (["-o", shard], ["--cache", base / "cache"], ["--plot", tuned / "f.png"]):
        code, _, err = run("survey", m, *args)
        assert code == 2 and "input checkpoint" in err, (args, err)
    assert sha(shard) == before and sorted(os.listdir(base)) == ["config.json", "model.safetensors"]


def test_the_cores_natural_order_is_pythons(tmp_path: Path) -> None:
    """The core sorts a diff's tensors in natural order (1M names in a fraction of Python's
    time); Python's natural_key, written apart with a regular expression, is the oracle. Names
    with Unicode digits are sorted by Python."""
    from rlmask._names import natural_sorted

    rng = np.random.default_rng(4)
    alphabet = list("ab.x_-") + list("0123456789")
    names = {"".join(rng.choice(alphabet, rng.integers(1, 14))) for _ in range(3000)}
    names |= {f"model.layers.{i}.w{j:02d}" for i in (0, 2, 10, 100) for j in (0, 3, 11)}
    names |= {"a1", "a01", "a001", "x99999999999999999999999", "x100000000000000000000000"}
    names = sorted(names)  # the core's own input order (its name index) is lexicographic
    tensors = {n: torch.ones(1) for n in names}
    save_file(tensors, tmp_path / "a.safetensors")
    save_file(tensors, tmp_path / "b.safetensors")
    got = rlmask.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    assert got.tensors["name"].to_list() == natural_sorted(names)
    unicode = [*names[:50], "layer.٣.w", "layer.12.w"]
    save_file({n: torch.ones(1) for n in unicode}, tmp_path / "u.safetensors")
    got = rlmask.diff(tmp_path / "u.safetensors", tmp_path / "u.safetensors", progress=False)
    assert got.tensors["name"].to_list() == natural_sorted(unicode)
