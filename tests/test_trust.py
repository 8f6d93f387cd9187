"""Trust: no confident figure over nothing, no death by signal, nothing half-written, no hole
for hostile files and names. Each test is one defect of issue 8, checked from the outside."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from oracle import sparse_pair, write_raw
from rlmask import _rlmask
from rlmask.cli import cli
from rlmask.examples import example_path

BASE, TUNED = example_path("base"), example_path("tuned-seed1")
RLMASK = [sys.executable, "-c", "from rlmask.cli import main; main()"]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _pair(tmp_path: Path, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[Path]:
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, pa)
    save_file(b, pb)
    return [pa, pb]


# ---------------------------------------------------------------------------------------
# No silent wrong answers


def test_nothing_compared_is_an_error(tmp_path: Path) -> None:
    code, out, err = run("diff", BASE, TUNED, "--include", "no_such_tensor")
    assert code == 1 and "matches the include/exclude" in err and "sparsity" not in out
    # Unrelated models whose names collide: every tensor is skipped as mismatched.
    a, b = _pair(tmp_path, {"w": torch.zeros(3)}, {"w": torch.zeros(4)})
    code, out, err = run("diff", a, b, "--skip-mismatched")
    assert code == 1 and "nothing to compare" in err and "1 skipped" in err
    with pytest.raises(rlmask.PairingError):
        rlmask.diff(a, b, skip_mismatched=True, progress=False)
    # Two masks given as checkpoints: refused for what they are.
    m = tmp_path / "m.rlmask"
    rlmask.diff(BASE, TUNED, save_mask=m, progress=False)
    code, _, err = run("diff", m, m)
    assert code == 1 and "is an rlmask mask file, not a model checkpoint" in err
    assert str(m) in err


def test_mostly_unpaired_names_are_an_error() -> None:
    shard = BASE / "model-00001-of-00002.safetensors"
    code, out, err = run("diff", shard, BASE)
    assert code == 1 and out == "" and "have no tensor of the same name" in err
    with pytest.raises(rlmask.PairingError) as e:
        rlmask.diff(shard, BASE, progress=False)
    msg = str(e.value)
    whole = rlmask.diff(BASE, BASE, progress=False).tensors
    in_shard = set(_rlmask.Checkpoint(shard).names())
    missing = whole.filter(~pl.col("name").is_in(list(in_shard)))
    assert f"{missing['numel'].sum()} of the {whole['numel'].sum()} floating elements" in msg
    assert "--include" in msg and "--name-map" in msg and "lm_head.weight" in msg
    # What they share can still be compared, and lm_head is not called tied.
    names = "|".join(n.replace(".", r"\.") for n in in_shard)
    report = rlmask.diff(shard, TUNED, include=f"^({names})$", progress=False)
    assert set(report.tensors["name"]) == in_shard and report.tied == []


def test_wrapped_and_mapped_names_pair_with_the_base(tmp_path: Path) -> None:
    base = {n: torch.randn(8, 4).to(torch.bfloat16) for n in ("model.a.weight", "model.b.weight")}
    tuned = {n: t.clone() for n, t in base.items()}
    tuned["model.a.weight"][0, :3] += 1
    plain = _pair(tmp_path, base, tuned)
    want = rlmask.diff(*plain, progress=False).to_dict()
    ddp = tmp_path / "ddp.safetensors"  # as torch.compile(DDP(model)).state_dict() spells it
    save_file({f"module._orig_mod.{n}": t for n, t in tuned.items()}, ddp)
    report = rlmask.diff(plain[0], ddp, progress=False)
    got = report.to_dict()
    assert got["changed"] == want["changed"] == [3]
    assert [t["name"] for t in got["tensors"]] == [t["name"] for t in want["tensors"]]
    assert got["renamed"]["tuned"] == [
        {"stored": f"module._orig_mod.{n}", "paired": n} for n in sorted(tuned)
    ]
    assert "names rewritten for pairing in tuned: 2" in report.summary()
    peft = tmp_path / "peft.safetensors"
    save_file({f"base_model.model.{n}": t for n, t in tuned.items()}, peft)
    code, _, err = run("diff", plain[0], peft)
    assert code == 1 and "have no tensor of the same name" in err
    code, out, _ = run(
        "diff", plain[0], peft, "--name-map", "base_model.model.=", "--format", "json"
    )
    assert code == 0 and json.loads(out)["changed"] == [3]
    assert run("diff", plain[0], peft, "--name-map", "nonsense")[0] == 2


def test_unreadable_shards_are_errors_naming_them(tmp_path: Path) -> None:
    def checkpoint_with(make: object) -> Path:
        d = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        save_file({"w": torch.zeros(4)}, d / "model-00001-of-00002.safetensors")
        bad = d / "model-00002-of-00002.safetensors"
        make(bad)  # type: ignore[operator]
        return d

    cases = {
        "dangling symlink": lambda p: p.symlink_to(p.parent / "gone"),
        "looping symlink": lambda p: p.symlink_to(p),
        "directory": lambda p: p.mkdir(),
        "fifo": lambda p: os.mkfifo(p),
    }
    for what, make in cases.items():
        d = checkpoint_with(make)
        with pytest.raises(rlmask.CheckpointError) as e:
            rlmask.diff(d, d, progress=False)
        assert "model-00002-of-00002.safetensors" in str(e.value), what
        assert e.value.path is not None and e.value.path.endswith("00002.safetensors"), what
    # The same behind an index: the shard it names cannot be used.
    d = checkpoint_with(lambda p: os.mkfifo(p))
    weight_map = {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(rlmask.CheckpointFormatError, match="holding tensor 'v'.*FIFO"):
        rlmask.diff(d, d, progress=False)


def _without_dac_override() -> None:
    """In a child about to exec: drop the capabilities that let root read any file, so that
    permission bits apply to it as to any user (no-op when not root)."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_an_error(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, {"w": torch.zeros(4)}, {"w": torch.zeros(4)})
    b.chmod(0)
    r = subprocess.run(
        [*RLMASK, "diff", str(a), str(b)],
        capture_output=True,
        text=True,
        preexec_fn=_without_dac_override,
    )
    assert r.returncode == 1, r.stderr
    assert f"{b}: Permission denied" in r.stderr and "Traceback" not in r.stderr


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path: Path) -> None:
    for name in ("model.bin", "weights.pt", "weights.pth"):
        torch.save({"w": torch.zeros(2)}, tmp_path / name)
        with pytest.raises(rlmask.CheckpointFormatError, match="is a PyTorch pickle.*never loads"):
            rlmask.diff(tmp_path / name, tmp_path / name, progress=False)
    # A pickle under another name is known by its bytes.
    (tmp_path / "weights").write_bytes((tmp_path / "model.bin").read_bytes())
    with pytest.raises(rlmask.CheckpointFormatError, match="is a PyTorch pickle"):
        rlmask.diff(tmp_path / "weights", tmp_path / "weights", progress=False)
    patch = tmp_path / "step.rlpatch"
    save_file({"w.indices": torch.zeros(1, dtype=torch.int32)}, patch, {"format": "rlmask-patch"})
    with pytest.raises(rlmask.CheckpointFormatError, match="is an rlmask patch file"):
        rlmask.diff(patch, patch, progress=False)


# ---------------------------------------------------------------------------------------
# Files that change while they are read


_TRUNCATE_AFTER_OPEN = """
import sys
from rlmask import _rlmask
from rlmask.errors import CheckpointChangedError
a, b = _rlmask.Checkpoint(sys.argv[1]), _rlmask.Checkpoint(sys.argv[2])
with open(sys.argv[2], "r+b") as f:
    f.truncate(4096)
try:
    _rlmask.diff(a, b, _rlmask.DiffOptions(_rlmask.Criterion("exact"), _rlmask.PlanOptions()))
except CheckpointChangedError as e:
    print("error:", e)
    sys.exit(0)
print("no error")
sys.exit(3)
"""


def test_truncated_while_mapped_is_an_error_not_sigbus(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, {"w": torch.ones(1 << 20)}, {"w": torch.ones(1 << 20)})
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_AFTER_OPEN, str(a), str(b)], capture_output=True, text=True
    )
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)  # -7 would be SIGBUS
    assert f"error: {b}: the file was truncated while it was being read" in r.stdout


_TRUNCATED_MASK = """
import sys
import rlmask
m = rlmask.load_mask(sys.argv[1])
with open(sys.argv[1], "r+b") as f:
    f.truncate(1024)
for what, call in (("overlap", lambda: rlmask.overlap(m, m)), ("combine", lambda: m & m),
                   ("count", lambda: m.count)):
    try:
        call()
        print(what, "no error")
    except rlmask.CheckpointChangedError as e:
        print(what, "error:", e)
"""


def test_a_mask_truncated_after_loading_gives_no_figures(tmp_path: Path) -> None:
    path = tmp_path / "m.rlmask"
    rlmask.Mask.from_dict({"w": np.ones(1 << 22, dtype=bool)}).save(path)
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATED_MASK, str(path)], capture_output=True, text=True
    )
    assert r.returncode == 0, (r.returncode, r.stderr)
    for what in ("overlap", "combine", "count"):
        assert f"{what} error: {path}: the file" in r.stdout, r.stdout


def _wait_until_mapped(p: subprocess.Popen, path: Path) -> None:
    """Waits until process `p` has memory-mapped `path` (its start-up varies with the
    machine's load), so that what follows happens during its pass, not before it."""
    target = str(path.resolve())
    for _ in range(2000):
        try:
            if target in Path(f"/proc/{p.pid}/maps").read_text():
                return
        except OSError:  # the process is gone
            pass
        assert p.poll() is None, p.communicate()
        time.sleep(0.005)
    raise AssertionError(f"{path} was never mapped")


def test_truncated_during_a_real_read_is_a_clean_error(tmp_path: Path) -> None:
    for _ in range(3):
        a, b = sparse_pair(tmp_path, 1 << 30)  # 4 GiB each, in holes
        p = subprocess.Popen(
            [*RLMASK, "diff", str(a), str(b)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_until_mapped(p, b)
        assert p.poll() is None, "the pass ended before the file could be truncated"
        with open(b, "r+b") as f:
            f.truncate(1 << 20)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, (p.returncode, err)
        assert f"{b}: the file" in err and "no figures from it are reported" in err
        assert "sparsity" not in out and "Traceback" not in err


# ---------------------------------------------------------------------------------------
# Options that would be silently ignored, and every sensible combination


@pytest.mark.parametrize(
    "args",
    [
        ["--eta", "1e-3"],
        ["--criterion", "exact", "--tol", "1e-3"],
        ["--criterion", "exact", "--tolerances", "1e-3,1e-4"],
        ["--criterion", "relative", "--eta", "1e-3", "--sweep"],
        ["--criterion", "relative"],
        ["--plot", "x.unknown"],
        ["--name-map", "no-equals-sign"],
    ],
)
def test_ignored_or_invalid_options_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    code, out, err = run(
        "diff", BASE, TUNED, *[tmp_path / a if a == "x.unknown" else a for a in args]
    )
    assert code == 2, (code, out, err)
    assert out == ""


def _modules(path: Path) -> list[str]:
    return rlmask.load_mask(path).table()["module"].to_list()


def test_other_commands_refuse_ignored_options(tmp_path: Path) -> None:
    masks = []
    for i, t in enumerate(("tuned-seed1", "tuned-seed2", "tuned-seed1")):
        masks.append(tmp_path / f"m{i}.rlmask")
        rlmask.diff(BASE, example_path(t), save_mask=masks[-1], progress=False)
    # --by with three masks is honoured: one row per ordered pair and module.
    code, out, _ = run("overlap", *masks, "--by", "module", "--format", "csv")
    assert code == 0 and len(out.strip().splitlines()) == 1 + 6 * len(set(_modules(masks[0])))
    assert run("overlap", *masks)[0] == 0
    for opt in (
        ["--rtol", "-1"],
        ["--atol", "-0.5"],
        ["--rtol", "nan"],
        ["--device", "nope"],
        ["--device", "meta"],
        ["--device", "cuda:99"],
    ):
        code, _, err = run("rank", BASE, TUNED, *opt)
        assert code == 2, (opt, err)
    assert run("rank", BASE, TUNED, "--device", "cuda:0")[0] == (
        0 if torch.cuda.is_available() else 2
    )


@pytest.mark.parametrize(
    "criterion",
    [
        [],
        ["--tol", "1e-4"],
        ["--sweep"],
        ["--tolerances", "1e-3,1e-6"],
        ["--criterion", "exact"],
        ["--criterion", "relative", "--eta", "1e-2"],
    ],
)
@pytest.mark.parametrize("by", ["total", "layer", "module", "tensor"])
def test_every_sensible_combination_runs(criterion: list[str], by: str, tmp_path: Path) -> None:
    png = tmp_path / "f.png"
    for fmt in ("table", "json", "csv", "parquet"):
        out = tmp_path / f"out.{fmt}"
        code, _, err = run(
            "diff",
            BASE,
            TUNED,
            *criterion,
            "--by",
            by,
            "--format",
            fmt,
            "-o",
            out,
            "--plot",
            png,
            "--save-mask",
            tmp_path / "m.rlmask",
        )
        assert code == 0, (criterion, by, fmt, err)
        assert out.stat().st_size > 0 and png.stat().st_size > 0
    report = rlmask.load_mask(tmp_path / "m.rlmask")
    assert report.numel == rlmask.diff(BASE, TUNED, progress=False).numel


def test_plot_of_a_sweep_draws_the_primary_tolerance() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from rlmask.plot import FORMATS, MATRICES, sparsity_by_layer

    report = rlmask.diff(BASE, TUNED, tol=1e-6, tolerances=rlmask.DEFAULT_SWEEP, progress=False)
    fig = sparsity_by_layer(report)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    modules = set(report.tensors.filter(pl.col("layer").is_not_null())["module"])
    assert set(lines) == (modules & set(MATRICES)) | {"layer (weighted)"}
    # The thick line is the numel-weighted sparsity at tol=1e-6, recomputed here.
    df = report.tensors.filter(pl.col("layer").is_not_null())
    per = (
        df.group_by("layer").agg(pl.col("numel").sum(), pl.col("changed@1e-06").sum()).sort("layer")
    )
    want = 100 * (1 - per["changed@1e-06"] / per["numel"])
    np.testing.assert_allclose(lines["layer (weighted)"].get_ydata(), want.to_numpy())
    assert "1e-06" in ax.get_title() and ax.get_xlabel() == "layer"
    # Every extension we accept is one matplotlib can write.
    assert set(FORMATS) <= set(fig.canvas.get_supported_filetypes())


# ---------------------------------------------------------------------------------------
# Full disks, and signals without a terminal


def _mount_tmpfs(folder: Path) -> bool:
    folder.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    )
    return r.returncode == 0


def _fill(folder: Path) -> None:
    """Takes every free block of the file system that holds ``folder``."""
    with open(folder / "fill", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


@pytest.fixture(params=["tmpfs", "rlimit"])
def full_disk(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Path, dict[str, object]]]:
    """A folder where writes fail: a nearly full 64 KiB tmpfs (needs root, as CI has), or any
    folder under a 1 KiB file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored)."""
    if request.param == "tmpfs":
        folder = tmp_path / "full"
        if not _mount_tmpfs(folder):
            pytest.skip("cannot mount a tmpfs here (not root); the rlimit case covers it")
        yield folder, {}
        subprocess.run(["umount", str(folder)], check=True)
        return

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    yield tmp_path, {"preexec_fn": limit}


def test_full_disk_is_a_clean_error_and_keeps_the_old_file(
    full_disk: tuple[Path, dict[str, object]],
) -> None:
    folder, how = full_disk
    outputs = {
        "--save-mask": "m.rlmask",
        "--plot": "f.png",
    }
    formats = {"json": "r.json", "csv": "r.csv", "parquet": "r.parquet"}
    jobs = [[opt, name] for opt, name in outputs.items()]
    jobs += [["--by", "tensor", "--format", fmt, "-o", name] for fmt, name in formats.items()]
    for job in jobs:
        (folder / job[-1]).write_bytes(b"previous")
    if not how:
        _fill(folder)
    before = set(os.listdir(folder))
    for job in jobs:
        target = folder / job[-1]
        r = subprocess.run(
            [*RLMASK, "diff", str(BASE), str(TUNED), *job[:-1], str(target)],
            capture_output=True,
            text=True,
            **how,
        )  # type: ignore[call-overload]
        assert r.returncode == 1, (job, r.returncode, r.stderr)
        assert r.stderr.startswith(f"Error: {target}: "), (job, r.stderr)
        assert "No space left on device" in r.stderr or "File too large" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert target.read_bytes() == b"previous"
        assert set(os.listdir(folder)) == before, "a temporary file was left behind"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_a_pass_without_a_terminal(sig: int, code: int, tmp_path: Path) -> None:
    a, b = sparse_pair(tmp_path, 1 << 30)
    mask = tmp_path / "m.rlmask"
    p = subprocess.Popen(
        [*RLMASK, "diff", str(a), str(b), "--save-mask", str(mask)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(0.5)
    assert p.poll() is None, "the pass ended before the signal"
    sent = time.monotonic()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    latency = time.monotonic() - sent
    assert p.returncode == code, (p.returncode, err)
    assert latency < 1.0, f"took {latency:.2f} s to stop"
    assert "nothing was written" in err and "Traceback" not in err and out == ""
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


def test_outputs_are_checked_before_the_pass(tmp_path: Path) -> None:
    for opt in (["-o"], ["--save-mask"], ["--plot"]):
        target = tmp_path / "missing" / "out.png"
        code, out, err = run("diff", BASE, TUNED, *opt, target)
        assert code == 1 and f"{target}: directory {target.parent} does not exist" in err
        assert out == ""
    with pytest.raises(rlmask.OutputError) as e:
        rlmask.diff(BASE, TUNED, save_mask=tmp_path / "missing" / "m.rlmask", progress=False)
    assert e.value.path == str(tmp_path / "missing" / "m.rlmask")
    report = rlmask.diff(BASE, TUNED, mask=True, progress=False)
    for write in (
        lambda p: report.to_json(p),
        lambda p: report.to_parquet(p),
        lambda p: report.mask.save(p),  # type: ignore[union-attr]
    ):
        with pytest.raises(rlmask.OutputError) as e:
            write(tmp_path / "missing" / "x")
        assert e.value.path == str(tmp_path / "missing" / "x") and ".tmp" not in str(e.value)


# ---------------------------------------------------------------------------------------
# Hostile files and names

HOSTILE = "model.layers.0.\x1b[2J\x1b]0;owned\x07q_proj\r\nweight"


def test_hostile_names_are_escaped_on_terminals_and_kept_in_files(tmp_path: Path) -> None:
    a, b = _pair(
        tmp_path,
        {HOSTILE: torch.zeros(4), "w": torch.zeros(8)},
        {HOSTILE: torch.ones(4), "w": torch.zeros(8)},
    )
    code, out, _ = run("diff", a, b, "--by", "tensor")
    assert code == 0 and "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\r\\n" in out
    # Four summary lines and the one listing both names as of unknown module type ('other'), a
    # blank, 'by tensor:', the header, the rule, two rows: no line added by the hostile name
    # (warnings aside: these toy weights are F32).
    assert len([x for x in out.splitlines() if not x.startswith("warning: ")]) == 11
    rows = json.loads(run("diff", a, b, "--by", "tensor", "--format", "json")[1])["tensors"]
    assert {r["name"] for r in rows} == {HOSTILE, "w"}
    run("diff", a, b, "--by", "tensor", "--format", "csv", "-o", tmp_path / "t.csv")
    assert set(pl.read_csv(tmp_path / "t.csv")["name"]) == {HOSTILE, "w"}
    run("diff", a, b, "--by", "tensor", "--format", "parquet", "-o", tmp_path / "t.parquet")
    assert set(pl.read_parquet(tmp_path / "t.parquet")["name"]) == {HOSTILE, "w"}
    # Errors: a mismatch on the hostile tensor, and a hostile file name.
    save_file({HOSTILE: torch.zeros(5), "w": torch.zeros(8)}, b)
    code, _, err = run("diff", a, b)
    assert code == 1 and "\x1b" not in err and "\\x1b[2J" in err and err.count("\n") == 1
    with pytest.raises(rlmask.TensorMismatchError) as e:
        rlmask.diff(a, b, progress=False)
    assert e.value.tensor == HOSTILE and "\x1b" not in str(e.value)
    evil = tmp_path / "evil\x1b[31m\n.safetensors"
    evil.write_bytes(b"\0" * 4)
    code, _, err = run("diff", evil, evil)
    assert code == 1 and "\x1b" not in err and err.count("\n") == 1


def _header(path: Path, header: str, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data)
    return path


def test_header_repeated_fields_and_huge_shapes(tmp_path: Path) -> None:
    rep = _header(
        tmp_path / "r.safetensors",
        '{"w":{"dtype":"F32","shape":[1],"dtype":"BF16","data_offsets":[0,4]}}',
        b"\0" * 4,
    )
    with pytest.raises(rlmask.CheckpointFormatError, match="duplicate field `dtype`") as e:
        rlmask.diff(rep, rep, progress=False)
    assert e.value.tensor == "w" and e.value.path == str(rep)
    huge = _header(
        tmp_path / "h.safetensors",
        '{"w":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}',
        b"",
    )
    with pytest.raises(rlmask.CheckpointFormatError, match="exceeds 2\\^63 - 1"):
        rlmask.diff(huge, huge, progress=False)


def _mask_file(path: Path, meta: dict[str, str], tensors: dict[str, bytes]) -> Path:
    write_raw(path, [(n, "U8", [len(d)], d) for n, d in tensors.items()], metadata=meta)
    return path


def test_malformed_mask_files_raise_mask_error_naming_file_and_tensor(tmp_path: Path) -> None:
    good_desc = {"w": {"shape": [10], "dtype": "BF16", "numel": 10}}
    base = {
        "format": "rlmask",
        "version": "1",
        "bitorder": "little",
        "tensors": json.dumps(good_desc),
    }
    ok = _mask_file(tmp_path / "ok.rlmask", base, {"w": bytes(8)})
    assert rlmask.load_mask(ok).numel == 10
    cases: list[tuple[dict[str, str], dict[str, bytes], str | None, str]] = [
        ({**base, "format": "other"}, {"w": bytes(8)}, None, "not an rlmask mask"),
        ({**base, "version": "2"}, {"w": bytes(8)}, None, "version '2' is not supported"),
        (
            {k: v for k, v in base.items() if k != "version"},
            {"w": bytes(8)},
            None,
            "version missing",
        ),
        ({**base, "bitorder": "big"}, {"w": bytes(8)}, None, "bitorder 'big'"),
        ({**base, "tensors": "[1, 2]"}, {"w": bytes(8)}, None, "not a JSON object"),
        ({**base, "tensors": "{"}, {"w": bytes(8)}, None, "not a JSON object"),
        ({k: v for k, v in base.items() if k != "tensors"}, {"w": bytes(8)}, None, "no 'tensors'"),
        (
            {**base, "tensors": json.dumps({"w": {"shape": [10], "dtype": "BF16", "numel": 11}})},
            {"w": bytes(8)},
            "w",
            "numel 11 does not match",
        ),
        (
            {
                **base,
                "tensors": json.dumps({"w": {"shape": [2**64 - 1], "dtype": "BF16", "numel": 1}}),
            },
            {"w": bytes(8)},
            "w",
            "exceeds 2^63 - 1",
        ),
        (
            {
                **base,
                "tensors": json.dumps(
                    {"w": {"shape": [2**32, 2**32], "dtype": "BF16", "numel": 0}}
                ),
            },
            {"w": bytes(8)},
            "w",
            "does not match",
        ),
        (
            {**base, "tensors": json.dumps({"w": {"shape": "10", "dtype": "BF16", "numel": 10}})},
            {"w": bytes(8)},
            "w",
            "malformed description",
        ),
        (
            {**base, "tensors": json.dumps({"w": {"shape": [10], "numel": 10}})},
            {"w": bytes(8)},
            "w",
            "missing field `dtype`",
        ),
        (
            {
                **base,
                "tensors": '{"w": {"shape": [10], "shape": [10], "dtype": "BF16", "numel": 10}}',
            },
            {"w": bytes(8)},
            "w",
            "duplicate field",
        ),
        (base, {"w": bytes(16)}, "w", "pack into U8[8]"),
        (base, {"w": bytes(2)}, "w", "pack into U8[8]"),
        (base, {"v": bytes(8)}, "w", "described but not stored"),
        (base, {"w": bytes(8), "v": bytes(8)}, "v", "stored but not described"),
    ]
    for i, (meta, tensors, tensor, want) in enumerate(cases):
        path = _mask_file(tmp_path / f"bad{i}.rlmask", meta, tensors)
        with pytest.raises(rlmask.MaskError) as e:
            rlmask.load_mask(path)
        assert want in str(e.value), (i, str(e.value))
        assert e.value.path == str(path) and e.value.tensor == tensor, i
    garbage = tmp_path / "garbage.rlmask"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(rlmask.MaskError, match="exceeds the limit") as e:
        rlmask.load_mask(garbage)
    assert e.value.path == str(garbage)
    code, _, err = run("mask", "info", garbage)
    assert code == 1 and err.startswith(f"Error: {garbage}: ")


def test_attaching_a_second_mask_is_refused() -> None:
    from rlmask.torch import attach_mask

    model = torch.nn.Linear(4, 4, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    ones = rlmask.Mask.from_dict({"weight": torch.ones(4, 4)})
    zeros = rlmask.Mask.from_dict({"weight": torch.zeros(4, 4)})
    first = attach_mask(model, ones, opt)
    with pytest.raises(rlmask.MaskError, match="already has a mask attached"):
        attach_mask(model, zeros, opt)
    other = torch.nn.Linear(4, 4, bias=False)
    with pytest.raises(rlmask.MaskError, match="this optimizer already"):
        attach_mask(other, zeros, opt)
    first.remove()
    second = attach_mask(model, zeros, opt)
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    # Only the second mask acts: it freezes everything, weight decay included.
    assert torch.equal(model.weight.detach(), before)
    second.remove()


def test_repo_ids_never_leave_the_hub_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    secret = tmp_path / "secret"
    secret.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    climbing = f"org/name@{'../' * 6}{secret}".replace("//", "/")
    for spec in (
        climbing,
        "org/name@../refs/main",
        "org/../name",
        "org/name@.hidden",
        "org/name@a..b/c",
        "-org/name",
    ):
        with pytest.raises(rlmask.CheckpointNotFoundError) as e:
            rlmask.diff(spec, spec, progress=False)
        assert "SECRET" not in str(e.value), spec
    # A ref file that holds something other than a commit is reported, never echoed.
    (repo / "refs" / "main").write_text("SECRET-HASH and more")
    with pytest.raises(rlmask.CheckpointNotFoundError, match="does not hold a commit hash") as e:
        rlmask.diff("org/name", "org/name", progress=False)
    assert "SECRET" not in str(e.value)
    # A snapshot that links outside the cache is refused.
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.zeros(2)}, outside / "model.safetensors")
    (repo / "refs" / "main").write_text("b" * 40)
    (repo / "snapshots" / ("b" * 40)).symlink_to(outside)
    with pytest.raises(rlmask.CheckpointNotFoundError, match="outside the hub cache"):
        rlmask.diff("org/name", "org/name", progress=False)
    code, _, err = run("diff", climbing, climbing)
    assert code == 1 and "SECRET" not in err


_INTERRUPTED_WORKER = """
import signal, threading, time
from rlmask._progress import run_in_worker
state = {"finished": False, "cancelled": False}
def work():
    for _ in range(60):  # about 0.6 s, stopping early once cancelled, as the core does
        if state["cancelled"]:
            break
        time.sleep(0.01)
    time.sleep(0.2)  # the last step, which must complete before the interrupt propagates
    state["finished"] = True
main = threading.main_thread().ident
threading.Timer(0.15, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
try:
    run_in_worker(work, on_interrupt=lambda: state.update(cancelled=True))
    print("no interrupt")
except KeyboardInterrupt:
    print("finished" if state["finished"] else "still running")
"""


def test_an_interrupt_propagates_only_after_the_worker_finished() -> None:
    """Ctrl-C while the main thread waits: the worker is asked to stop and waited for, so the
    interrupt never propagates while it still writes (Thread.join before Python 3.13 could
    return early after an interrupt landed inside it, leaving temporary outputs behind)."""
    for _ in range(5):
        r = subprocess.run(
            [sys.executable, "-c", _INTERRUPTED_WORKER], capture_output=True, text=True
        )
        assert r.stdout.strip() == "finished", (r.stdout, r.stderr)
