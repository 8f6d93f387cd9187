"""Masked training under FSDP2, for real: ``torchrun --nproc_per_node 2`` with the gloo
backend on the CPU, a tiny transformers Llama sharded with ``fully_shard`` per decoder layer
and at the root, AdamW with weight decay and gradient clipping, fp32 and bf16 mixed precision,
fresh and resumed optimizers (issue 26)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import fsdp_worker as W

HERE = Path(__file__).parent


def _torchrun(out: Path, nproc: int, runs: str | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    with socket.socket() as s:  # a free port for the rendezvous (port 0 hangs torchrun)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(HERE / "fsdp_worker.py"),
            str(out),
            *([runs] if runs else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun(out, 2)
    return out


def _moved(run: dict, mask: object) -> tuple[int, int, int]:
    """(frozen elements that moved, trained elements that moved, trained elements), compared
    on the gathered full tensors against the mask's bits unpacked by numpy."""
    frozen = trained = total = 0
    for key in run:
        if not key.startswith("after.") or key.startswith("tracked"):
            continue
        name = key[len("after.") :]
        keep = np.unpackbits(mask.packed(name), bitorder="little")  # type: ignore[attr-defined]
        keep = keep[: run[key].numel()].astype(bool)
        moved = (run[key] != run[f"before.{name}"]).reshape(-1).numpy()
        frozen += int((moved & ~keep).sum())
        trained += int((moved & keep).sum())
        total += int(keep.sum())
    return frozen, trained, total


@pytest.mark.parametrize("name", ["fp32", "bf16", "resumed", "ddp"])
def test_frozen_elements_stay_bit_identical_sharded(fsdp_runs: Path, name: str) -> None:
    run = load_file(fsdp_runs / f"{name}.safetensors")
    mask = W.mask_for(W.model())
    frozen, trained, total = _moved(run, mask)
    assert frozen == 0, f"{frozen} frozen elements moved under FSDP2 ({name})"
    assert trained > 0.9 * total, (trained, total)
    # Unmasked, the same run moves the frozen elements too: the test has power.
    unmasked = load_file(fsdp_runs / "fp32-unmasked.safetensors")
    assert _moved(unmasked, mask)[0] > 0


def test_three_ranks_with_uneven_shards(tmp_path: Path) -> None:
    """A mesh of 3: rows of 32, 16 and 64 split unevenly (11/11/10, 6/6/4, 22/22/20), so each
    rank's slice of the mask and the shard's padding must line up."""
    _torchrun(tmp_path, 3, "fp32,bf16")
    mask = W.mask_for(W.model())
    for name in ("fp32", "bf16"):
        frozen, trained, total = _moved(load_file(tmp_path / f"{name}.safetensors"), mask)
        assert frozen == 0, f"{frozen} frozen elements moved on 3 ranks ({name})"
        assert trained > 0.9 * total, (trained, total)


def test_fsdp2_equals_one_process_within_reduction_noise(fsdp_runs: Path) -> None:
    """The masked FSDP2 run against the same masked run in one process, no sharding, the whole
    batch: they differ by no more than the unmasked runs do (the order of reductions)."""

    def gap(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("after."))

    one_masked = W.run("fp32", False, 0, True, rank=0, world=1)
    one_plain = W.run("fp32-unmasked", False, 0, False, rank=0, world=1)
    masked_gap = gap(load_file(fsdp_runs / "fp32.safetensors"), one_masked)
    plain_gap = gap(load_file(fsdp_runs / "fp32-unmasked.safetensors"), one_plain)
    assert masked_gap <= max(4 * plain_gap, 1e-6), (masked_gap, plain_gap)
    # And the one-process masked run keeps its frozen elements too.
    assert _moved(one_masked, W.mask_for(W.model()))[0] == 0


def test_figures_that_would_be_one_ranks_are_refused(fsdp_runs: Path) -> None:
    refusals = (fsdp_runs / "refusals.txt").read_text().splitlines()
    assert len(refusals) == 1
    line = refusals[0]
    assert line.startswith("live patches does not support FSDP2") and "one rank's" in line, line
    assert not (fsdp_runs / "never.rlpatch").exists()


def test_track_sync_reports_the_models_figures_on_every_rank(fsdp_runs: Path) -> None:
    """SyncCostCallback on a sharded run: each step's counts and patch sizes are those of the
    gathered full bf16 tensors, recomputed here with numpy, and the same on both ranks."""
    import json

    import torch

    from rlmask import _rlmask

    histories = [json.loads((fsdp_runs / f"sync-history-{r}.json").read_text()) for r in (0, 1)]
    for h in (*histories[0], *histories[1]):
        h.pop("rlmask/measure_seconds")
    assert histories[0] == histories[1]
    snaps = load_file(fsdp_runs / "sync.safetensors")
    names = sorted(k[len("step0.") :] for k in snaps if k.startswith("step0."))

    def bits(t: torch.Tensor) -> np.ndarray:
        return t.contiguous().view(torch.int16).numpy().reshape(-1)

    numel = sum(snaps[f"step0.{n}"].numel() for n in names)
    for k, h in enumerate(histories[0], start=1):
        since_last = since_start = plain = compact = 0
        for n in names:
            now, last, start = (bits(snaps[f"step{j}.{n}"]) for j in (k, k - 1, 0))
            idx = np.flatnonzero(now != last)
            since_last += idx.size
            since_start += int((now != start).sum())
            count = now.size
            if idx.size:
                plain += min(idx.size * (4 + 2), count * 2)
                values = snaps[f"step{k}.{n}"].reshape(-1)[torch.from_numpy(idx)]
                compact += _rlmask.compact_bytes(
                    idx.astype(np.int64), values.contiguous().view(torch.uint8).numpy(), 2, count
                )
        assert h["step"] == k
        assert h["rlmask/changed_since_last"] == pytest.approx(since_last / numel)
        assert h["rlmask/changed_since_start"] == pytest.approx(since_start / numel)
        assert h["rlmask/sync_bytes"] == plain and h["rlmask/sync_bytes_compact"] == compact
        assert h["rlmask/full_bytes"] == 2 * numel
    assert histories[0][-1]["rlmask/changed_since_start"] > 0


@pytest.mark.parametrize("name", ["fp32", "bf16", "ddp"])
def test_the_update_tracker_reports_the_models_figures(fsdp_runs: Path, name: str) -> None:
    """UpdateTracker on the sharded run: its all-reduced counts and gathered final mask are the
    changes of the gathered full tensors, element for element, never one rank's shard."""
    run = load_file(fsdp_runs / f"{name}.safetensors")
    changed = total = 0
    for key in run:
        if key.startswith("after."):
            n = key[len("after.") :]
            truth = (run[key] != run[f"before.{n}"]).reshape(-1)
            assert (run[f"tracked.{n}"].bool() == truth).all(), n
            changed += int(truth.sum())
            total += truth.numel()
    at_end, last_row, numel = run["tracked_counts"].tolist()
    assert at_end == last_row == changed > 0 and numel == total
