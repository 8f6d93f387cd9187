"""Sparse patches (design §9): applying is bit-exact, checked by comparing files byte for byte
(byte-written checkpoints of every dtype, odd sizes, empty, unchanged and fully changed
tensors, shuffled data order, two shards with an index; and transformers-written ones), chains
are checked by fingerprint, corrupt patches and other bases are refused, and the plain form
applies with safetensors and torch alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

import rlmask
import rlmask.patch as P
from oracle import write_raw
from rlmask.cli import cli

# (dtype, bytes per element)
DTYPES = [
    ("BF16", 2),
    ("F16", 2),
    ("F32", 4),
    ("F64", 8),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("U8", 1),
    ("I8", 1),
    ("I16", 2),
    ("I32", 4),
    ("I64", 8),
    ("BOOL", 1),
]


def _tensors(rng: np.random.Generator) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    out = []
    for k, (dtype, size) in enumerate(DTYPES):
        shape = (3 + k, 17 + 2 * k)  # odd sizes, not multiples of 8 bytes
        raw = rng.integers(0, 256, int(np.prod(shape)) * size, dtype=np.uint8)
        if dtype == "BOOL":
            raw = raw & 1
        out.append((f"model.layers.{k}.mlp.up_proj.weight", dtype, shape, raw.tobytes()))
    out.append(("model.empty", "BF16", (0, 4), b""))
    out.append(("model.same", "F32", (5,), rng.integers(0, 256, 20, dtype=np.uint8).tobytes()))
    out.append(("model.dense", "BF16", (6, 7), rng.integers(0, 256, 84, dtype=np.uint8).tobytes()))
    return out


def _move(
    rng: np.random.Generator, tensors: list, share: float
) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """A tuned version: about ``share`` of each tensor's elements get new bits; model.same is
    kept, model.dense is changed everywhere."""
    out = []
    for name, dtype, shape, data in tensors:
        size = dict(DTYPES)[dtype]
        raw = np.frombuffer(data, np.uint8).copy().reshape(-1, size) if data else np.zeros((0, 1))
        if name != "model.same" and raw.size:
            pick = rng.random(raw.shape[0]) < (1.0 if name == "model.dense" else share)
            raw[pick, 0] ^= (
                1 if dtype == "BOOL" else rng.integers(1, 256, int(pick.sum()), np.uint8)
            )
        out.append((name, dtype, shape, raw.astype(np.uint8).tobytes()))
    return out


def _write_sharded(folder: Path, tensors: list) -> None:
    """Two shards with an index, data laid out in reverse order (offsets not in header order)."""
    folder.mkdir(parents=True)
    half = len(tensors) // 2
    weight_map = {}
    for i, part in enumerate((tensors[:half], tensors[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        write_raw(
            folder / name,
            part,
            data_order=list(reversed(range(len(part)))),
            metadata={"format": "pt"},
            pad_to=8,
        )
        weight_map |= {t[0]: name for t in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    a = _tensors(rng)
    b = _move(rng, a, 0.05)
    c = _move(rng, b, 0.2)
    for name, t in (("A", a), ("B", b), ("C", c)):
        _write_sharded(tmp_path / name, t)
    return tmp_path / "A", tmp_path / "B", tmp_path / "C"


@pytest.mark.parametrize("codec", P.CODECS)
def test_apply_is_bit_exact_for_every_dtype(
    chain: tuple[Path, Path, Path], tmp_path: Path, codec: str
) -> None:
    a, b, _ = chain
    info = P.create(a, b, tmp_path / "ab.rlpatch", codec=codec, progress=False)
    assert info.codec == codec == P.load(tmp_path / "ab.rlpatch").metadata["codec"]
    forms = dict(zip(info.tensors["name"], info.tensors["form"], strict=True))
    assert forms["model.same"] == "none" and forms["model.empty"] == "none"
    assert forms["model.dense"] == "dense"
    layers = {forms[f"model.layers.{k}.mlp.up_proj.weight"] for k in range(len(DTYPES))}
    assert layers == ({"sparse"} if codec == "plain" else {"sparse", "compact"})
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    P.apply(a, [tmp_path / "ab.rlpatch"], tmp_path / "out", progress=False)
    _same_files(tmp_path / "out", b)  # shards, index and config, byte for byte
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before  # base untouched
    P.verify(a, tmp_path / "ab.rlpatch", b, progress=False)


def test_changed_counts_and_sizes_against_numpy(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    a, b, _ = chain
    info = P.create(a, b, tmp_path / "ab.rlpatch", codec="plain", progress=False)
    want = {}
    # Count with raw bytes read back by the official library (via torch, every dtype).
    for f in sorted(a.glob("*.safetensors")):
        with safe_open(str(f), "pt") as x, safe_open(str(b / f.name), "pt") as y:
            for name in x.keys():  # noqa: SIM118
                ta, tb = x.get_tensor(name), y.get_tensor(name)
                size = ta.element_size()
                ra = ta.reshape(-1).contiguous().view(torch.uint8).numpy().reshape(-1, size)
                rb = tb.reshape(-1).contiguous().view(torch.uint8).numpy().reshape(-1, size)
                want[name] = int((ra != rb).any(axis=1).sum())
    got = dict(zip(info.tensors["name"], info.tensors["changed"], strict=True))
    assert got == want
    sparse = info.tensors.filter(info.tensors["form"] == "sparse")
    idx = 4 * int(sparse["changed"].sum())
    assert info.stored["indices"] == idx
    sizes = {d: s for d, s in DTYPES}
    assert info.stored["values"] == sum(
        c * sizes[d] for c, d in zip(sparse["changed"], sparse["dtype"], strict=True)
    )
    assert info.bytes == (tmp_path / "ab.rlpatch").stat().st_size


def _decode_frames(frames: np.ndarray, blob: np.ndarray, size: int, numel: int) -> tuple:
    """An independent decoder of the compact codec (design §9), with the `zstandard` package:
    per frame, varint gaps from -1 then the values' byte planes."""
    import zstandard

    indices, values, at = [], [], 0
    for k, (start, count, nbytes) in enumerate(frames.tolist()):
        end = frames[k + 1][0] if k + 1 < len(frames) else numel
        raw = zstandard.ZstdDecompressor().decompress(blob[at : at + nbytes].tobytes())
        at += nbytes
        pos, prev = 0, -1
        for _ in range(count):
            gap = shift = 0
            while True:
                byte = raw[pos]
                pos += 1
                gap |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            prev = prev + 1 + gap
            assert prev < end - start
            indices.append(start + prev)
        planes = np.frombuffer(raw[pos:], np.uint8).reshape(size, count)
        values.append(planes.T.copy())
    assert at == blob.size
    return np.array(indices, np.int64), np.concatenate(values).reshape(-1)


def test_compact_frames_against_a_python_decoder(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The compact file read back with safetensors and decoded in Python gives exactly the
    changes numpy finds; the core's decoding (`changes`) agrees, and so do the sizes."""
    a, b, _ = chain
    plain = P.create(a, b, tmp_path / "p.rlpatch", codec="plain", progress=False)
    info = P.create(a, b, tmp_path / "c.rlpatch", codec="compact", progress=False)
    data = plain.bytes - _header_bytes(plain.path) - _padding_bytes(plain.path)
    assert info.plain_bytes == plain.plain_bytes == data
    f = rlmask._rlmask.PatchFile(tmp_path / "c.rlpatch")
    # Each tensor in the smallest form: compact where frames beat plain indices and values.
    sizes = dict(DTYPES)
    for name, dtype, changed, numel, form in info.tensors.select(
        "name", "dtype", "changed", "numel", "form"
    ).iter_rows():
        if form == "sparse":
            assert changed * (4 + sizes[dtype]) < numel * sizes[dtype], name
    sparse = info.tensors.filter(pl.col("form") == "compact")
    assert sparse.height >= len(DTYPES) // 2 and info.stored["compact"] > 0
    with safe_open(str(tmp_path / "c.rlpatch"), "np") as h:
        for name, dtype, numel in sparse.select("name", "dtype", "numel").iter_rows():
            size = dict(DTYPES)[dtype]
            got = _decode_frames(
                h.get_tensor(f"{name}.frames"), h.get_tensor(f"{name}.compact"), size, numel
            )
            ra, rb = (_raw(x, name).reshape(-1, size) for x in (a, b))
            want = np.flatnonzero((ra != rb).any(axis=1))
            assert np.array_equal(got[0], want), name
            assert np.array_equal(got[1], rb[want].reshape(-1)), name
            core = f.changes(name)
            assert np.array_equal(core[0], want) and np.array_equal(core[1], got[1])


def _raw(folder: Path, name: str) -> np.ndarray:
    """A tensor's raw bytes, read with the official library (via torch, every dtype)."""
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as h:
            if name in h.keys():  # noqa: SIM118
                return h.get_tensor(name).reshape(-1).contiguous().view(torch.uint8).numpy()
    raise KeyError(name)


def _header_bytes(path: str) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def _header(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return json.loads(fh.read(int.from_bytes(fh.read(8), "little")))


def _padding_bytes(path: str | Path) -> int:
    """Bytes of the `NAME.pad` tensors that align a version-3 patch's pieces."""
    spans = [v["data_offsets"] for k, v in _header(path).items() if k.endswith(".pad")]
    return sum(end - start for start, end in spans)


@pytest.mark.parametrize("codec", P.CODECS)
def test_stored_tensors_are_aligned_without_holes(
    chain: tuple[Path, Path, Path], tmp_path: Path, codec: str
) -> None:
    """Version 3 lays each tensor's pieces out in B's order as the pass finishes them: read
    from the raw header, the stored tensors cover the data exactly (no hole, no overlap), each
    starts at a multiple of its element size in the file, and padding is one `NAME.pad` of 1
    to 7 bytes at most per tensor; the official reader opens it."""
    a, b, c = chain
    for x, y, name in ((a, b, "ab"), (b, c, "bc"), (a, c, "ac")):
        out = tmp_path / f"{name}.rlpatch"
        P.create(x, y, out, codec=codec, progress=False)
        header = _header(out)
        assert header["__metadata__"]["version"] == "3"
        start = _header_bytes(str(out))
        assert start % 8 == 0
        width = {"BOOL": 1, "U8": 1, "I32": 4} | dict(DTYPES)
        spans = sorted(
            (v["data_offsets"], k, v["dtype"]) for k, v in header.items() if k != "__metadata__"
        )
        at = 0
        for (begin, end), key, dtype in spans:
            assert begin == at, key
            assert (start + begin) % width[dtype] == 0, (key, dtype, begin)
            at = end
        assert start + at == out.stat().st_size
        pads = [k for _, k, _ in spans if k.endswith(".pad")]
        assert len(pads) == len(set(pads))
        for k in pads:
            begin, end = header[k]["data_offsets"]
            assert header[k]["dtype"] == "U8" and 1 <= end - begin <= 7, k
            assert k.removesuffix(".pad") in json.loads(header["__metadata__"]["tensors"])
        with safe_open(str(out), "np") as h:
            assert sorted(h.keys()) == sorted(k for _, k, _ in spans)


@pytest.mark.parametrize(
    "codecs", [("plain", "plain"), ("compact", "compact"), ("plain", "compact")]
)
def test_chains_are_checked(
    chain: tuple[Path, Path, Path], tmp_path: Path, codecs: tuple[str, str]
) -> None:
    a, b, c = chain
    p1, p2 = tmp_path / "1.rlpatch", tmp_path / "2.rlpatch"
    P.create(a, b, p1, codec=codecs[0], progress=False)
    P.create(b, c, p2, codec=codecs[1], progress=False)
    P.apply(a, [p1, p2], tmp_path / "ac", progress=False)
    _same_files(tmp_path / "ac", c)
    for wrong, what in (
        ([p2], "not the one patch"),  # the first patch missing
        ([p1, p1], "a patch is missing, repeated or out of order"),
        ([p2, p1], "not the one patch|missing, repeated or out of order"),
    ):
        with pytest.raises(rlmask.PairingError, match=what) as e:
            P.apply(a, wrong, tmp_path / "bad", progress=False)
        assert "tensor '" in str(e.value)
        assert not (tmp_path / "bad").exists()
    # An existing, non-empty output is refused; an empty one is used.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(rlmask.OutputError):
        P.apply(a, [p1], tmp_path / "full", progress=False)
    (tmp_path / "empty").mkdir()
    P.apply(a, [p1], tmp_path / "empty", progress=False)
    _same_files(tmp_path / "empty", b)
    with pytest.raises(rlmask.PairingError, match="is not what patch"):
        P.verify(a, p1, c, progress=False)


@pytest.mark.parametrize("codec", P.CODECS)
def test_corrupt_patches_are_refused(
    chain: tuple[Path, Path, Path], tmp_path: Path, codec: str
) -> None:
    a, b, _ = chain
    p = tmp_path / "ab.rlpatch"
    P.create(a, b, p, codec=codec, progress=False)
    data = bytearray(p.read_bytes())
    header = _header(p)
    stored = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    last = max((v[1], k) for k, v in stored.items() if not k.endswith(".pad"))[0]
    # A flipped last byte of the last stored piece (a value, or a compact frame's checksum):
    # the result no longer has the promised fingerprint, or the frame no longer decodes.
    data[_header_bytes(str(p)) + last - 1] ^= 0xFF
    bad = tmp_path / "flipped.rlpatch"
    bad.write_bytes(bytes(data))
    with pytest.raises(rlmask.CheckpointFormatError, match="corrupt patch") as e:
        P.apply(a, [bad], tmp_path / "out", progress=False)
    assert e.value.tensor is not None and not (tmp_path / "out").exists()
    # A byte of padding that is not zero: refused on opening, naming the tensor.
    pad = next(k for k in stored if k.endswith(".pad"))
    data = bytearray(p.read_bytes())
    data[_header_bytes(str(p)) + stored[pad][0]] = 1
    bad.write_bytes(bytes(data))
    with pytest.raises(rlmask.CheckpointFormatError, match="padding .* not zeros") as e:
        P.load(bad)
    assert e.value.tensor == pad.removesuffix(".pad")
    # Not a patch at all.
    with pytest.raises(rlmask.CheckpointFormatError, match="not an rlmask patch"):
        P.load(next(a.glob("*.safetensors")))
    # Applied to a checkpoint with other tensors (one shard of the base alone).
    with pytest.raises(rlmask.PairingError, match="was not made for"):
        P.apply(a / "model-00001-of-00002.safetensors", [p], tmp_path / "x", progress=False)


def test_plain_patch_applies_with_safetensors_and_torch(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The README's snippet: the plain form needs nothing but safetensors and torch."""
    a, b, _ = chain
    P.create(a, b, tmp_path / "ab.rlpatch", codec="plain", progress=False)
    from safetensors.torch import load_file

    # --- the snippet -------------------------------------------------------------------
    patch = load_file(tmp_path / "ab.rlpatch")
    model = {}
    for f in sorted(a.glob("*.safetensors")):
        model |= load_file(f)
    for name, t in model.items():
        if f"{name}.dense" in patch:
            model[name] = patch[f"{name}.dense"]
        elif f"{name}.indices" in patch:
            flat = t.reshape(-1).clone()  # indexed assignment: index_copy_ lacks float8 on CPU
            flat[patch[f"{name}.indices"].long()] = patch[f"{name}.values"]
            model[name] = flat.reshape(t.shape)
    # ------------------------------------------------------------------------------------
    want = {}
    for f in sorted(b.glob("*.safetensors")):
        want |= load_file(f)
    for name, t in want.items():
        got = model[name]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert got.reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8)), name


def _tiny_llama() -> Any:
    """A bf16 llama-shaped model built by transformers from a config (nothing downloaded)."""
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_transformers_checkpoints_and_the_cli(tmp_path: Path) -> None:
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (torch.rand_like(p.float()) < 0.1))
    model.save_pretrained(tmp_path / "tuned")
    runner = CliRunner()

    def patch_cli(*args: object) -> Any:
        return runner.invoke(cli, ["patch", *map(str, args)])

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    r = patch_cli("create", base, tuned, "-o", tmp_path / "t.rlpatch", "-q")
    assert r.exit_code == 0, r.stderr
    assert "per changed element" in r.stdout
    r = patch_cli("apply", base, tmp_path / "t.rlpatch", "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    _same_files(tmp_path / "out", tuned)
    r = patch_cli("info", tmp_path / "t.rlpatch", "--format", "json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["bytes"] == os.path.getsize(tmp_path / "t.rlpatch")
    assert sum(t["changed"] for t in d["tensors"]) == d["changed"] > 0
    assert d["codec"] == "compact" and d["plain_bytes"] > 0  # the default codec
    # --codec plain: the same changes, the size the plain table predicts.
    r = patch_cli("create", base, tuned, "-o", tmp_path / "p.rlpatch", "--codec", "plain", "-q")
    assert r.exit_code == 0 and "plain codec" in r.stdout, r.stderr
    plain = P.load(tmp_path / "p.rlpatch")
    assert plain.changed == d["changed"] and plain.plain_bytes == d["plain_bytes"]
    r = patch_cli("info", tmp_path / "t.rlpatch")
    assert "compact codec" in r.stdout and "in the plain codec" in r.stdout, r.stdout
    r = patch_cli("verify", base, tmp_path / "t.rlpatch", tuned, "-q")
    assert r.exit_code == 0 and r.stdout.startswith("ok:"), r.stderr
    r = patch_cli("verify", tuned, tmp_path / "t.rlpatch", "-q")
    assert r.exit_code == 1 and "not the one patch" in r.stderr


def test_live_patches_keep_an_inference_copy_bit_identical(tmp_path: Path) -> None:
    """A bf16 model trained for many steps; after every step the step's patch, made from the
    live model against the last synced state, applied in place to a second copy: the copies
    stay bit-identical at every step, and a patch applied out of order is refused."""
    import rlmask.torch as rt

    torch.manual_seed(0)
    trainer = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    ).to(torch.bfloat16)
    server = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    ).to(torch.bfloat16)
    server.load_state_dict(trainer.state_dict())
    synced = rt.snapshot(trainer)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    changed = []
    for step in range(12):
        x = torch.randn(8, 16, generator=g).bfloat16()
        trainer(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        path = tmp_path / f"{step}.rlpatch"
        changed.append(rt.make_patch(trainer, synced, path))
        info = P.load(path)  # the core validates the file written from torch
        assert info.changed == changed[-1]
        rt.apply_patch(server, path)
        for (n, a), (_, b) in zip(
            trainer.state_dict().items(), server.state_dict().items(), strict=True
        ):
            assert a.view(torch.int16).equal(b.view(torch.int16)), (step, n)
    assert all(c > 0 for c in changed)
    with pytest.raises(rlmask.PairingError, match="not in the state"):
        rt.apply_patch(server, tmp_path / "3.rlpatch")


def test_live_records_keep_a_server_copy_bit_identical() -> None:
    """A live sync loop without files: after every step of a bf16 model, live_records' records
    scattered into a second copy keep it bit-identical; each record holds exactly the elements
    whose bits changed (the oracle: the two states compared here), ascending, int32; the
    snapshot follows what was taken (a loop stopped after one record leaves the rest)."""
    import rlmask.torch as rt

    torch.manual_seed(0)
    trainer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)).bfloat16()
    server = {k: v.clone() for k, v in trainer.state_dict().items()}
    synced = rt.snapshot(trainer)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        trainer(torch.randn(8, 16, generator=g).bfloat16()).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        before = {k: v.clone() for k, v in synced.items()}
        seen = set()
        for r in rt.live_records(trainer, synced):
            now = trainer.state_dict()[r["name"]]
            moved = (now.view(torch.int16) != before[r["name"]].view(torch.int16)).reshape(-1)
            assert torch.equal(r["indices"].long(), moved.nonzero().reshape(-1))
            assert r["indices"].dtype == torch.int32 and r["shape"] == list(now.shape)
            server[r["name"]].view(-1)[r["indices"].long()] = r["values"]
            seen.add(r["name"])
        assert seen
        for k, v in trainer.state_dict().items():
            assert v.view(torch.int16).equal(server[k].view(torch.int16)), k
            assert v.view(torch.int16).equal(synced[k].view(torch.int16)), k
    trainer(torch.randn(8, 16, generator=g).bfloat16()).float().square().mean().backward()
    opt.step()
    first = next(rt.live_records(trainer, synced))
    state = trainer.state_dict()
    assert synced[first["name"]].view(torch.int16).equal(state[first["name"]].view(torch.int16))
    assert any(not synced[k].equal(v) for k, v in state.items() if k != first["name"])


def test_trl_files_and_vllm_records(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Our patches as TRL delta-sync files (raw and gap_delta, read back by hand with
    safetensors) and back, and as vLLM's sparse-update records."""
    from safetensors.torch import load_file

    a, b, _ = chain
    p = tmp_path / "ab.rlpatch"
    P.create(a, b, p, progress=False)
    want = {}
    for f in sorted(b.glob("*.safetensors")):
        want |= load_file(f)
    base = {}
    for f in sorted(a.glob("*.safetensors")):
        base |= load_file(f)
    for encoding in ("raw", "gap_delta"):
        trl = tmp_path / f"{encoding}.safetensors"
        r = CliRunner().invoke(
            cli, ["patch", "convert", str(p), "--to", "trl", "--encoding", encoding, "-o", str(trl)]
        )
        assert r.exit_code == 0, r.stderr
        # TRL's reader, written from its format description: absolute values at flat indices.
        with safe_open(str(trl), "pt") as h:
            meta = h.metadata()
            assert meta["format"] == "sparse_weight_patch" and meta["encoding"] == encoding
            got = {k: v.clone() for k, v in base.items()}
            for key in h.keys():  # noqa: SIM118
                if not key.endswith(".idx"):
                    continue
                name, raw = key[:-4], h.get_tensor(key).to(torch.int64)
                if encoding == "gap_delta":
                    assert h.get_tensor(key).dtype in (torch.uint16, torch.uint32)
                    raw = torch.cumsum(raw + 1, 0) - 1
                else:
                    assert h.get_tensor(key).dtype == torch.int32
                flat = got[name].reshape(-1)
                flat[raw] = h.get_tensor(f"{name}.val")
        for name, t in want.items():
            assert got[name].reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8))
        # Back to ours: the same tensors, applying to the same result.
        back = tmp_path / f"{encoding}.rlpatch"
        r = CliRunner().invoke(
            cli, ["patch", "convert", str(trl), "--to", "rlmask", "--base", str(a), "-o", str(back)]
        )
        assert r.exit_code == 0, r.stderr
        P.verify(a, back, b, progress=False)
    r = CliRunner().invoke(
        cli,
        [
            "patch",
            "convert",
            str(tmp_path / "raw.safetensors"),
            "--to",
            "rlmask",
            "-o",
            str(tmp_path / "x.rlpatch"),
        ],
    )
    assert r.exit_code == 2 and "--base" in r.stderr
    # vLLM records: full shapes, absolute values at int32 flat indices, ascending; values
    # must be free of NaN (the random-bit fixture has some, so real weights are used here).
    with pytest.raises(ValueError, match="a NaN value"):
        list(P.records(p))
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    w0 = {
        "model.layers.0.mlp.experts.1.up_proj.weight": torch.randn(40, 24, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(24),
    }
    w1 = {k: v + (torch.rand(v.shape, generator=g) < 0.1) * 0.5 for k, v in w0.items()}
    w1 = {k: v.to(w0[k].dtype) for k, v in w1.items()}
    for side, w in (("v0", w0), ("v1", w1)):
        (tmp_path / side).mkdir()
        save_file(w, tmp_path / side / "model.safetensors")
    v = tmp_path / "v.rlpatch"
    P.create(tmp_path / "v0", tmp_path / "v1", v, progress=False)
    n = 0
    for rec in P.records(v):
        n += 1
        t = w0[rec["name"]].reshape(-1).clone()
        assert rec["indices"].dtype == torch.int32 and not rec["int64_indices"]
        assert list(w1[rec["name"]].shape) == rec["shape"]
        assert bool((rec["indices"][1:] > rec["indices"][:-1]).all())
        t[rec["indices"].long()] = rec["values"]
        assert t.view(torch.uint8).equal(w1[rec["name"]].reshape(-1).view(torch.uint8))
    assert n == P.load(v).tensors.filter(pl.col("form") != "none").height == 2


def test_sync_cost_callback_in_a_trainer(tmp_path: Path) -> None:
    """A Trainer run with track_sync: the logged shares and bytes against copies of the
    parameters taken by an independent callback at every step."""
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rlmask.integrations.transformers import track_sync

    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (32, 16), generator=g)
    ]

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.states = {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.states[0] = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_step_end(self, args, state, control, model=None, **kw):
            self.states[state.global_step] = {
                n: p.detach().clone() for n, p in model.named_parameters()
            }

    recorder = Recorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=100,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    track_sync(trainer, every=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rlmask/sync_bytes" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]

    def changed(a: dict, b: dict) -> tuple[int, int, int]:
        n = c = sync = 0
        for k, t in a.items():
            d = int((t.view(torch.int16) != b[k].view(torch.int16)).sum())
            n, c = n + t.numel(), c + d
            sync += min(d * 6, t.numel() * 2) if d else 0
        return n, c, sync

    for h in logged:
        s = h["step"]
        numel, last, sync = changed(recorder.states[s], recorder.states[s - 2])
        _, start, _ = changed(recorder.states[s], recorder.states[0])
        assert h["rlmask/changed_since_last"] == pytest.approx(last / numel)
        assert h["rlmask/changed_since_start"] == pytest.approx(start / numel)
        assert h["rlmask/sync_bytes"] == sync and h["rlmask/full_bytes"] == 2 * numel
        assert 0 < h["rlmask/changed_since_last"] <= 1 and h["rlmask/measure_seconds"] > 0
        # Compact bytes: what a compact patch file between the two states stores.
        for step in (s - 2, s):
            (tmp_path / f"s{step}").mkdir(exist_ok=True)
            save_file(recorder.states[step], tmp_path / f"s{step}" / "model.safetensors")
        info = P.create(
            tmp_path / f"s{s - 2}",
            tmp_path / f"s{s}",
            tmp_path / f"{s}.rlpatch",
            codec="compact",
            progress=False,
        )
        assert h["rlmask/sync_bytes_compact"] == info.stored["compact"] + info.stored["dense"]
        assert h["rlmask/sync_bytes_compact"] < h["rlmask/sync_bytes"]


def test_sync_cost_of_fp32_master_weights_sent_as_bf16() -> None:
    """With dtype=bfloat16, an fp32 model is measured as the bf16 weights a sync would send:
    the history against bf16 casts compared with numpy, step by step."""
    from types import SimpleNamespace

    from rlmask.integrations.transformers import SyncCostCallback

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cb = SyncCostCallback(every=1, dtype=torch.bfloat16)
    control = SimpleNamespace(should_log=False)
    cb.on_train_begin(None, SimpleNamespace(global_step=0), control, model=model)

    def bf16_bits() -> dict[str, np.ndarray]:
        return {
            n: p.detach().bfloat16().view(torch.int16).numpy().copy()
            for n, p in model.named_parameters()
        }

    states = [bf16_bits()]
    for step in range(1, 5):
        opt.zero_grad()
        model(torch.randn(16, 64)).square().mean().backward()
        opt.step()
        cb.on_step_end(None, SimpleNamespace(global_step=step), control, model=model)
        states.append(bf16_bits())
    assert [h["step"] for h in cb.history] == [1, 2, 3, 4]
    for h in cb.history:
        now, before, start = states[h["step"]], states[h["step"] - 1], states[0]
        numel = sum(v.size for v in now.values())
        last = {n: int((now[n] != before[n]).sum()) for n in now}
        assert h["rlmask/changed_since_last"] == pytest.approx(sum(last.values()) / numel)
        assert h["rlmask/changed_since_start"] == pytest.approx(
            sum(int((now[n] != start[n]).sum()) for n in now) / numel
        )
        assert h["rlmask/full_bytes"] == 2 * numel  # bf16, not the fp32 master's 4
        assert h["rlmask/sync_bytes"] == sum(min(6 * c, 2 * now[n].size) for n, c in last.items())


def test_one_atomic_writer_for_concurrent_writes_and_leftovers(tmp_path: Path) -> None:
    """Two threads creating the same patch each write their own temporary (O_EXCL, unique
    names) and the target is one whole patch that rebuilds the tuned checkpoint; a leftover of
    a killed run beside the target (its process gone) is removed by the next write."""
    import threading

    from rlmask.examples import trained_path

    base, tuned = trained_path("base"), trained_path("rl-seed1")
    out = tmp_path / "p.rlpatch"
    dead = tmp_path / ".p.rlpatch.part.4194999.0.tmp"  # pid above Linux's pid_max
    dead.write_bytes(b"half a patch")
    errors: list[BaseException] = []

    def make() -> None:
        try:
            rlmask.patch.create(base, tuned, out, progress=False)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.rlpatch"]
    rebuilt = tmp_path / "rebuilt"
    rlmask.patch.apply(base, out, rebuilt, progress=False)
    assert rlmask.diff(tuned, rebuilt, criterion="exact", progress=False).changed == 0


def _tree_fingerprint(data: bytes) -> str:
    """The version-2 fingerprint (design §9) by the `xxhash` package: XXH3-128 of every 64 KiB
    leaf in canonical form, then of the digests and the little-endian u64 length."""
    import xxhash

    leaves = b"".join(
        xxhash.xxh3_128(data[i : i + (1 << 16)]).digest() for i in range(0, len(data), 1 << 16)
    )
    return xxhash.xxh3_128(leaves + len(data).to_bytes(8, "little")).hexdigest()


def _rewrite_metadata(path: Path, out: Path, change: Any, *, relayout: bool = True) -> None:
    """Copies a patch file with its ``__metadata__`` passed through ``change`` and (with
    ``relayout``) its data laid out as versions 1 and 2 were: no `NAME.pad`, stored tensors by
    element size, largest first (each stays aligned)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = change(header.pop("__metadata__"))
    width = {"U8": 1, "I32": 4} | dict(DTYPES)
    keys = sorted(
        (k for k in header if not (relayout and k.endswith(".pad"))),
        key=lambda k: -width[header[k]["dtype"]] if relayout else header[k]["data_offsets"][0],
    )
    data, layout = b"", {"__metadata__": meta}
    for k in keys:
        begin, end = header[k]["data_offsets"]
        layout[k] = header[k] | {"data_offsets": [len(data), len(data) + end - begin]}
        data += raw[8 + n + begin : 8 + n + end]
    text = json.dumps(layout, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_fingerprints_against_xxhash_and_version_1_patches(tmp_path: Path) -> None:
    """Every fingerprint a patch holds is the tree of XXH3-128 recomputed here (tensors of one
    short leaf, exactly two leaves, 48 and a short one); a version-1 patch (BLAKE3
    fingerprints, computed here with the `blake3` package) is still applied and checked; a
    chain mixing the two is refused."""
    import blake3

    rng = np.random.default_rng(7)
    sizes = {"big.weight": ("BF16", (1_600_003,)), "two.weight": ("U8", (2 << 16,))}
    sizes["one.weight"] = ("F32", (3,))
    base = [
        (
            n,
            d,
            s,
            rng.integers(
                0, 256, int(np.prod(s)) * (2 if d == "BF16" else 4 if d == "F32" else 1), np.uint8
            ).tobytes(),
        )
        for n, (d, s) in sizes.items()
    ]
    tuned = []
    for n, d, s, data in base:
        raw = np.frombuffer(data, np.uint8).copy()
        raw[rng.random(raw.size) < 0.01] ^= 1
        tuned.append((n, d, s, raw.tobytes()))
    for name, tensors in (("A", base), ("B", tuned)):
        (tmp_path / name).mkdir()
        write_raw(tmp_path / name / "model.safetensors", tensors, pad_to=8)
    a, b = tmp_path / "A", tmp_path / "B"
    p = tmp_path / "ab.rlpatch"
    info = P.create(a, b, p, progress=False)
    assert P.load(p).metadata["version"] == "3"
    rows = {r["name"]: r for r in info.tensors.iter_rows(named=True)}
    for (n, _, _, old), (_, _, _, new) in zip(base, tuned, strict=True):
        assert rows[n]["base"] == _tree_fingerprint(old), n
        assert rows[n]["tuned"] == _tree_fingerprint(new), n

    # The same patch as an older rlmask wrote it: version 1, BLAKE3.
    def as_v1(meta: dict[str, str], *, wrong: bool = False) -> dict[str, str]:
        tensors = json.loads(meta["tensors"])
        for (n, _, _, old), (_, _, _, new) in zip(base, tuned, strict=True):
            tensors[n]["base"] = blake3.blake3(old).hexdigest()
            tensors[n]["tuned"] = blake3.blake3(new if not wrong else new + b"x").hexdigest()
        return meta | {"version": "1", "tensors": json.dumps(tensors)}

    v1 = tmp_path / "v1.rlpatch"
    _rewrite_metadata(p, v1, as_v1)
    P.apply(a, [v1], tmp_path / "out1", progress=False)
    _same_files(tmp_path / "out1", b)
    P.verify(a, v1, b, progress=False)
    bad = tmp_path / "v1-wrong.rlpatch"
    _rewrite_metadata(p, bad, lambda m: as_v1(m, wrong=True))
    with pytest.raises(rlmask.CheckpointFormatError, match="fingerprint the patch promises"):
        P.apply(a, [bad], tmp_path / "out2", progress=False)
    # The same patch as version 2 wrote it (no padding): applied, and chained with version 3.
    v2 = tmp_path / "v2.rlpatch"
    _rewrite_metadata(p, v2, lambda m: m | {"version": "2"})
    assert P.load(v2).metadata["version"] == "2"
    P.apply(a, [v2], tmp_path / "out2b", progress=False)
    _same_files(tmp_path / "out2b", b)
    p2 = tmp_path / "ba.rlpatch"
    P.create(b, a, p2, progress=False)
    P.apply(a, [v2, p2], tmp_path / "out2c", progress=False)
    _same_files(tmp_path / "out2c", a)
    # Padding in a version 2 patch: refused (that version had none).
    _rewrite_metadata(p, v2, lambda m: m | {"version": "2"}, relayout=False)
    assert any(k.endswith(".pad") for k in _header(v2))
    with pytest.raises(rlmask.CheckpointFormatError, match="stored in the patch but not described"):
        P.load(v2)
    # A version-3 patch after a version-1 one: refused, saying why.
    with pytest.raises(rlmask.PairingError, match="fingerprints of different kinds"):
        P.apply(a, [v1, p2], tmp_path / "out3", progress=False)
    # A fingerprint of the wrong kind for the version, and an unknown version.
    mixed = tmp_path / "mixed.rlpatch"
    _rewrite_metadata(p, mixed, lambda m: m | {"version": "1"})
    with pytest.raises(rlmask.CheckpointFormatError, match="is not a fingerprint of a version"):
        P.load(mixed)
    _rewrite_metadata(p, mixed, lambda m: m | {"version": "4"})
    with pytest.raises(rlmask.CheckpointFormatError, match='version "4" .*newer rlmask'):
        P.load(mixed)
    _rewrite_metadata(p, mixed, lambda m: {k: v for k, v in m.items() if k != "version"})
    with pytest.raises(rlmask.CheckpointFormatError, match="states no version"):
        P.load(mixed)


def test_each_change_is_written_once(tmp_path: Path) -> None:
    """A patch is written once: the bytes this process dirties in the page cache while
    creating it (Linux's per-task I/O accounting) are the patch's own, not also those of
    scratch files copied into it (they had been: twice the patch). A tensor past what is held
    in memory is placed instead (tested in the core: `tensors_past_the_held_limit_...`)."""
    io_file = Path("/proc/self/io")
    assert io_file.exists(), "needs Linux's per-task I/O accounting (/proc/self/io)"

    def dirtied() -> int:
        fields = dict(line.split(": ") for line in io_file.read_text().splitlines())
        return int(fields["write_bytes"])

    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**16, 2_000_000, dtype=np.uint16)
    tuned = base.copy()
    tuned[rng.random(base.size) < 0.2] ^= 1
    for name, data in (("A", base), ("B", tuned)):
        (tmp_path / name).mkdir()
        write_raw(
            tmp_path / name / "model.safetensors",
            [("w", "BF16", (2_000_000,), data.tobytes())],
            pad_to=8,
        )
    for codec in P.CODECS:
        before = dirtied()
        info = P.create(tmp_path / "A", tmp_path / "B", tmp_path / f"{codec}.rlpatch", codec=codec)
        written = dirtied() - before
        assert info.bytes > 500_000
        assert info.bytes <= written < 1.1 * info.bytes + (64 << 10), (codec, written, info.bytes)
