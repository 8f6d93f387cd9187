"""Every header and index defect is a typed, one-line error naming the file and the tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rlmask
from oracle import write_raw
from rlmask._rlmask import Checkpoint
from rlmask.errors import CheckpointFormatError, CheckpointNotFoundError

GOOD = [("w", "F32", [2], b"\0" * 8), ("v", "BF16", [3], b"\1" * 6)]


def _header_file(path: Path, header: object, data: bytes) -> Path:
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _error(path: Path) -> str:
    with pytest.raises(CheckpointFormatError) as e:
        Checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_truncated_file(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    write_raw(p, GOOD)
    p.write_bytes(p.read_bytes()[:-3])
    assert "tensor 'v'" in _error(p) and "past the end" in _error(p)
    p.write_bytes(b"\1\2\3")
    assert "too short" in _error(p)


def test_header_length_past_end(tmp_path: Path) -> None:
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert "header length 10000 runs past the end" in _error(p)
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert "exceeds the limit" in _error(p)


def test_overlapping_offsets(tmp_path: Path) -> None:
    h = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    msg = _error(_header_file(tmp_path / "o.safetensors", h, b"\0" * 12))
    assert "tensor 'b'" in msg and "overlaps tensor 'a'" in msg


def test_gap_and_trailing_bytes(tmp_path: Path) -> None:
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    assert "belong to no tensor" in _error(_header_file(tmp_path / "g.safetensors", h, b"\0" * 8))
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    msg = _error(_header_file(tmp_path / "e.safetensors", h, b"\0" * 9))
    assert "5 bytes after the last tensor" in msg


def test_unknown_dtype_and_size_mismatch(tmp_path: Path) -> None:
    h = {"w": {"dtype": "F6_E2M3", "shape": [2], "data_offsets": [0, 1]}}
    msg = _error(_header_file(tmp_path / "d.safetensors", h, b"\0"))
    assert "tensor 'w'" in msg and "unknown dtype 'F6_E2M3'" in msg
    h = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    msg = _error(_header_file(tmp_path / "s.safetensors", h, b"\0" * 8))
    assert "tensor 'w'" in msg and "needs 12 bytes" in msg


def test_bad_json_and_duplicates(tmp_path: Path) -> None:
    assert "not valid JSON" in _error(_header_file(tmp_path / "j.safetensors", '{"w": {', b""))
    dup = (
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        '"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    msg = _error(_header_file(tmp_path / "u.safetensors", dup, b"\0" * 8))
    assert "tensor 'w'" in msg and "more than once" in msg
    meta = {"__metadata__": {"n": 3}}
    assert "__metadata__" in _error(_header_file(tmp_path / "m.safetensors", meta, b""))


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, d / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, d / "s2.safetensors")
    return d


def _index(d: Path, weight_map: dict[str, str]) -> Path:
    p = d / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return p


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    p = _index(d, {"a": "s1.safetensors", "b": "s3.safetensors"})
    with pytest.raises(CheckpointFormatError) as e:
        Checkpoint(d)
    msg = str(e.value)
    assert str(p) in msg and "'s3.safetensors'" in msg and "tensor 'b'" in msg


def test_index_disagreeing_with_shards(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    _index(d, {"a": "s2.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointFormatError, match="tensor 'a' is listed in 's2.safetensors'"):
        Checkpoint(d)
    save_file({"a": torch.zeros(2), "c": torch.zeros(1)}, d / "s1.safetensors")
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointFormatError, match="tensor 'c' is stored in .* not listed"):
        Checkpoint(d)
    _index(d, {"a": "../s1.safetensors"})
    with pytest.raises(CheckpointFormatError, match="must be a file name inside"):
        Checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointFormatError, match="not a valid index"):
        Checkpoint(d)


def test_duplicate_tensor_across_shards_without_index(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    save_file({"a": torch.ones(2)}, d / "s3.safetensors")
    with pytest.raises(CheckpointFormatError, match="tensor 'a': also present in"):
        Checkpoint(d)


def test_checkpoint_forms(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    assert Checkpoint(d).names() == ["a", "b"]  # shards without an index
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    assert Checkpoint(d).names() == ["a", "b"]  # with an index
    assert Checkpoint(d / "model.safetensors.index.json").names() == ["a", "b"]
    assert Checkpoint(d / "s2.safetensors").names() == ["b"]  # one file
    single = tmp_path / "single"
    single.mkdir()
    save_file({"x": torch.zeros(1)}, single / "model.safetensors")
    save_file({"y": torch.zeros(1)}, single / "other.safetensors")
    assert Checkpoint(single).names() == ["x"]  # model.safetensors wins
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        Checkpoint(empty)
    (empty / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointNotFoundError, match=r"pytorch_model\.bin \(PyTorch pickles"):
        Checkpoint(empty)


def test_cancelled_comparison_raises_keyboard_interrupt(tmp_path: Path) -> None:
    from rlmask._rlmask import Criterion, DiffOptions, PlanOptions, Progress, diff

    save_file({"w": torch.zeros(1000)}, tmp_path / "a.safetensors")
    a = Checkpoint(tmp_path / "a.safetensors")
    watch = Progress()
    watch.cancel()
    options = DiffOptions(Criterion("absolute"), PlanOptions())
    with pytest.raises(KeyboardInterrupt):
        diff(a, a, options, progress=watch)
    done = Progress()
    diff(a, a, options, progress=done)
    assert done.total == done.done == 8000


def test_diff_reports_corruption_without_crashing(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    write_raw(good, GOOD)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(rlmask.CheckpointFormatError, match="bad.safetensors"):
        rlmask.diff(good, bad, progress=False)
