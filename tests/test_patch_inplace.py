"""``patch apply --in-place`` (issue 31): the checkpoint directory updated where it lies, byte
for byte the copying apply's result, refused when it is not the patch's base, and crash-safe:
killed at any moment, the directory holds the old weights, the new ones, or a journal that
every command refuses until ``rlmask patch recover`` restores the old weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import rlmask
import rlmask.patch as P
from rlmask.cli import cli
from test_patch import _move, _tensors, _write_sharded


def _in_place(served: Path, patch: Path) -> list[str]:
    """The command line of an in-place apply in a process of its own."""
    cli_main = "from rlmask.cli import main; main()"
    return [
        sys.executable,
        "-c",
        cli_main,
        "patch",
        "apply",
        str(served),
        str(patch),
        "--in-place",
        "-q",
    ]


def test_ctrl_c_leaves_the_old_weights_or_the_new(run: tuple, tmp_path: Path) -> None:
    """SIGINT at moments spread over an apply: exit 130 with the old weights (a cancel while
    writing rolls back from the journal), or exit 0 with the new ones; never a journal left."""
    a, b, _, ab, _ = run
    old, new = _files(a), _files(b)
    for k in range(6):
        served = tmp_path / f"i{k}"
        shutil.copytree(a, served)
        p = subprocess.Popen(_in_place(served, ab), stderr=subprocess.PIPE, text=True)
        time.sleep(0.1 + 0.2 * k)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert not (served / rlmask._rlmask.APPLY_JOURNAL).exists()
        assert (p.returncode, _files(served)) in ((130, old), (0, new)), (p.returncode, err)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path, Path, Path, Path]:
    rng = np.random.default_rng(1)
    a = _tensors(rng)
    b = _move(rng, a, 0.05)
    c = _move(rng, b, 0.2)
    for name, t in (("A", a), ("B", b), ("C", c)):
        _write_sharded(tmp_path / name, t)
    P.create(tmp_path / "A", tmp_path / "B", tmp_path / "ab.rlpatch", progress=False)
    P.create(tmp_path / "B", tmp_path / "C", tmp_path / "bc.rlpatch", progress=False)
    return (
        tmp_path / "A",
        tmp_path / "B",
        tmp_path / "C",
        tmp_path / "ab.rlpatch",
        tmp_path / "bc.rlpatch",
    )


def test_in_place_is_the_copying_apply(run: tuple, tmp_path: Path) -> None:
    a, _, c, ab, bc = run
    served = tmp_path / "served"
    shutil.copytree(a, served)
    inodes = {p.name: p.stat().st_ino for p in served.iterdir()}
    r = CliRunner().invoke(
        cli, ["patch", "apply", str(served), str(ab), str(bc), "--in-place", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert _files(served) == _files(c)  # shards, index, config: byte for byte
    assert {p.name: p.stat().st_ino for p in served.iterdir()} == inodes  # the same files
    # Applied again, the chain no longer starts here: refused, nothing written.
    before = _files(served)
    with pytest.raises(rlmask.PairingError, match="fingerprint"):
        P.apply_in_place(served, [ab], progress=False)
    assert _files(served) == before
    r = CliRunner().invoke(cli, ["patch", "apply", str(served), str(ab)])
    assert r.exit_code == 2 and "--in-place" in r.output


def test_a_crash_leaves_old_or_new_weights_or_a_journal_that_restores_the_old(
    run: tuple, tmp_path: Path
) -> None:
    a, b, _, ab, _ = run
    old, new = _files(a), _files(b)
    outcomes = set()
    for after in (1, 2, 3):
        served = tmp_path / f"served-{after}"
        shutil.copytree(a, served)
        p = subprocess.run(
            _in_place(served, ab),
            env={**os.environ, "RLMASK_TEST_CRASH_AFTER_WRITES": str(after)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert p.returncode == -signal.SIGABRT, p.stderr
        journal = served / rlmask._rlmask.APPLY_JOURNAL
        assert journal.is_file()
        assert _files(served) not in (old, new) or after >= 3
        # Refused while the journal is there, by every command that reads it.
        for args in (
            ["diff", str(served), str(a)],
            ["patch", "apply", str(served), str(ab), "--in-place"],
        ):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code != 0 and "patch recover" in r.output, r.output
        r = CliRunner().invoke(cli, ["patch", "recover", str(served)])
        assert r.exit_code == 0 and "restored" in r.output, r.output
        assert _files(served) == old
        outcomes.add(after)
        # And then the apply goes through.
        P.apply_in_place(served, [ab], progress=False)
        assert _files(served) == new
    assert (
        CliRunner()
        .invoke(cli, ["patch", "recover", str(a)])
        .output.endswith("nothing to recover\n")
    )


def test_killed_at_random_moments(run: tuple, tmp_path: Path) -> None:
    """SIGKILL at moments spread over a whole apply: every outcome is the old weights, the new
    ones, or a journal whose recovery gives the old ones."""
    a, b, _, ab, _ = run
    old, new = _files(a), _files(b)
    seen = set()
    for k in range(8):
        served = tmp_path / f"k{k}"
        shutil.copytree(a, served)
        p = subprocess.Popen(
            _in_place(served, ab),
        )
        time.sleep(0.05 + 0.15 * k)
        p.send_signal(signal.SIGKILL)
        p.wait()
        files = {k: v for k, v in _files(served).items() if not k.startswith(".rlmask")}
        if (served / rlmask._rlmask.APPLY_JOURNAL).exists():
            P.recover(served)
            assert _files(served) == old
            seen.add("journal")
        else:
            assert files in (old, new)
            seen.add("old" if files == old else "new")
    assert seen & {"old", "new"}


def _rewrite(path: Path, meta: Any = None, frames: Any = None) -> None:
    """Rewrites a patch file as a hostile sender might: ``meta`` edits the described tensors
    (the ``tensors`` metadata), ``frames`` edits a compact tensor's frame table (int64 rows)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw[8 + n :])
    described = json.loads(header["__metadata__"]["tensors"])
    if meta is not None:
        meta(described)
    header["__metadata__"]["tensors"] = json.dumps(described)
    if frames is not None:
        key = next(k for k in header if k.endswith(".frames"))
        a, b = header[key]["data_offsets"]
        table = np.frombuffer(bytes(data[a:b]), np.int64).reshape(-1, 3).copy()
        frames(key.removesuffix(".frames"), table, described)
        data[a:b] = table.tobytes()
        header["__metadata__"]["tensors"] = json.dumps(described)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data))


def test_hostile_patches_get_clean_errors_at_bounded_cost(run: tuple, tmp_path: Path) -> None:
    """Issue 31: a frame that claims a huge number of changes (the decoder sized its buffers
    by the claim: 103 GB asked for by a 537-byte patch) and a later patch of a chain that lies
    about a dtype (read with the base's element size, it panicked) are refused, one line."""
    import resource

    a, _, _, ab, bc = run
    # A tensor said to be 2^36 elements whose first frame claims 2^35 changes, the entry's
    # count raised to match: every other check passes.
    huge = tmp_path / "huge.rlpatch"
    huge.write_bytes(ab.read_bytes())

    def claim(name: str, table: np.ndarray, described: dict) -> None:
        extra = (1 << 35) - int(table[0, 1])
        table[0, 1] = 1 << 35
        described[name]["changed"] += extra
        described[name]["shape"] = [1 << 20, 1 << 16]

    _rewrite(huge, frames=claim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for args in (
        ["patch", "convert", str(huge), "--to", "trl", "-o", str(tmp_path / "t.safetensors")],
        ["patch", "apply", str(a), str(huge), "-o", str(tmp_path / "out")],
        ["patch", "info", str(huge)],
    ):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        assert r.output.count("\n") == 1 and "frame" in r.output, r.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    # A second patch whose description gives a compact tensor another dtype than base's.
    lying = tmp_path / "lying.rlpatch"
    lying.write_bytes(bc.read_bytes())

    said: list[str] = []

    def f32(described: dict) -> None:
        name = next(n for n, d in described.items() if d["form"] == "compact")
        said.append("F64" if described[name]["dtype"] != "F64" else "U8")
        described[name]["dtype"] = said[0]

    _rewrite(lying, meta=f32)
    r = CliRunner().invoke(
        cli, ["patch", "apply", str(a), str(ab), str(lying), "-o", str(tmp_path / "o2")]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert said[0] in r.output and "lying.rlpatch" in r.output, r.output
    assert not (tmp_path / "o2").exists()
