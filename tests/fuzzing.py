"""A seeded mutation fuzzer over what rlmask reads from untrusted files: safetensors headers,
``model.safetensors.index.json`` files and ``.rlmask`` metadata.

Each case starts from a valid file made here (several dtypes, odd shapes, metadata) and applies
one to three mutations, structural (a field's value replaced by an edge value, a field dropped,
repeated or added, names made hostile, entries duplicated) or raw (bytes flipped, inserted or cut,
the header length changed). It then goes through everything a user would run on it:

- headers: ``rlmask.diff(f, f)``, and when accepted, the report (``to_dict``, ``summary``, per
  layer and module, JSON) with the self-diff's invariant checked (a file compared with itself
  has no changed element);
- index files: the same on a checkpoint directory whose index was mutated;
- masks: ``rlmask.load_mask`` and, when accepted, counts, table, summary and a self-overlap.

Outcomes: ``ok`` (accepted, invariants hold), ``error`` (a clean :class:`rlmask.RlmaskError`),
``crash`` (any other exception, a panic, a broken invariant), ``hang`` (a case slower than
:data:`HANG_SECONDS`). For headers it also asks the official ``safetensors`` reader and records
every file one reader accepts and the other refuses.

Used by ``tests/test_fuzz.py`` (a few thousand cases in every CI run) and by ``bench/fuzz.py``
(millions, by hand; figures in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import copy
import json
import random
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oracle import SIZES

HANG_SECONDS = 2.0

DTYPES = [
    "BOOL",
    "U8",
    "I8",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
    "F8_E4M3",
    "F8_E5M2",
]
EDGE_INTS = [
    0,
    1,
    2,
    7,
    8,
    63,
    64,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -1,
    -(2**63),
]
EDGE_VALUES: list[Any] = [
    None,
    True,
    "",
    "x",
    1.5,
    -0.0,
    1e308,
    [],
    {},
    [[]],
    {"a": 1},
    "\x1b[2J\n",
]
HOSTILE_NAMES = [
    "",
    "__metadata__",
    "a" * 5000,
    "\x1b]0;x\x07",
    "model.layers.99999999999999999999.w",
    "model.layers.0.q_proj.weight\n",
    "名前",
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
]


# -------------------------------------------------------------------------------------------
# Valid files to start from


def _header_bytes(header: dict[str, Any], rng: random.Random) -> bytes:
    text = json.dumps(header, separators=rng.choice([(",", ":"), (", ", ": ")])).encode()
    return text + b" " * rng.choice([0, -len(text) % 8, 3])


def make_checkpoint(rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """A valid safetensors file as (header dict, data), with a few tensors of random dtypes
    and shapes (some empty, some scalar), data in random order, sometimes metadata."""
    header: dict[str, Any] = {}
    if rng.random() < 0.5:
        header["__metadata__"] = {"format": "pt", "note": rng.choice(["x", "", "é"])}
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(rng.randint(0, 2))]
    names += rng.sample(
        [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "w",
            "model.layers.1.self_attn.q_proj.weight",
        ],
        rng.randint(1, 3),
    )
    chunks = []
    for name in names:
        dtype = rng.choice(DTYPES)
        shape = rng.choice([[], [0], [3], [2, 5], [1, 7, 3], [65], [0, 4]])
        n = int(np.prod(shape)) if shape else 1
        chunks.append((name, dtype, shape, rng.randbytes(n * SIZES[dtype])))
    rng.shuffle(chunks)
    offset, data = 0, b""
    for name, dtype, shape, blob in chunks:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        data += blob
    return header, data


def file_bytes(header: dict[str, Any], data: bytes, rng: random.Random) -> bytes:
    text = _header_bytes(header, rng)
    return struct.pack("<Q", len(text)) + text + data


def make_mask(rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """A valid ``.rlmask`` file as (header dict with metadata, data)."""
    described, header, data = {}, {}, b""
    for i in range(rng.randint(1, 3)):
        shape = rng.choice([[0], [1], [10], [8, 8], [3, 65]])
        numel = int(np.prod(shape))
        nbytes = (numel + 63) // 64 * 8
        described[f"model.layers.{i}.w"] = {"shape": shape, "dtype": "BF16", "numel": numel}
        header[f"model.layers.{i}.w"] = {
            "dtype": "U8",
            "shape": [nbytes],
            "data_offsets": [len(data), len(data) + nbytes],
        }
        data += rng.randbytes(nbytes)
    meta = {
        "format": "rlmask",
        "version": "1",
        "bitorder": "little",
        "source": "fuzz",
        "tensors": json.dumps(described),
    }
    return {"__metadata__": meta, **header}, data


# -------------------------------------------------------------------------------------------
# Mutations


def _edge(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.5:
        return rng.choice(EDGE_INTS)
    if r < 0.8:
        return copy.deepcopy(rng.choice(EDGE_VALUES))  # never a shared, mutable constant
    return rng.choice([*DTYPES, "F6_E2M3", "Q8", "bf16", "F8_E4M3FN"])


def mutate_structure(header: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """One structural mutation; returns the header and a note for repeated keys to splice in
    as raw text (a dict cannot hold them)."""
    names = [n for n in header if n != "__metadata__"]
    op = rng.randrange(12)
    note = ""
    if op == 0 and names:  # a field gets an edge value
        e = header[rng.choice(names)]
        if isinstance(e, dict):
            e[rng.choice(["dtype", "shape", "data_offsets"])] = _edge(rng)
    elif op == 1 and names:  # one number in shape or offsets
        e = header[rng.choice(names)]
        if isinstance(e, dict):
            key = rng.choice(["shape", "data_offsets"])
            old = e.get(key)
            v = list(old) if isinstance(old, list) and old else [0]
            if v:
                v[rng.randrange(len(v))] = rng.choice(
                    EDGE_INTS + [x + rng.choice([-1, 1]) for x in v if isinstance(x, int)]
                )
            if rng.random() < 0.2:
                v.append(rng.choice(EDGE_INTS))
            e[key] = v
    elif op == 2 and names:  # a field dropped, or an unknown one added
        e = header[rng.choice(names)]
        if isinstance(e, dict):
            if rng.random() < 0.5 and e:
                e.pop(rng.choice(list(e)))
            else:
                e[rng.choice(["extra", "dtype2", "offsets"])] = _edge(rng)
    elif op == 3 and names:  # a hostile or clashing name
        old = rng.choice(names)
        header[rng.choice(HOSTILE_NAMES + names)] = header.pop(old)
    elif op == 4:  # metadata with odd values
        header["__metadata__"] = rng.choice([_edge(rng), {"k": _edge(rng)}, {"k": "v" * 1000}])
    elif op == 5 and names:  # an entry dropped
        header.pop(rng.choice(names))
    elif op == 6 and names:  # an entry copied under a new name (overlapping data)
        header[f"copy.{rng.randrange(9)}"] = json.loads(json.dumps(header[rng.choice(names)]))
    elif op == 7:
        note = "repeat-entry"
    elif op == 8:
        note = "repeat-field"
    elif op == 9:  # a whole other JSON value
        return {"__not_a_dict__": _edge(rng)} if rng.random() < 0.5 else {}, note
    elif op == 10 and names:  # the entry itself replaced
        header[rng.choice(names)] = _edge(rng)
    elif op == 11 and "__metadata__" in header and isinstance(header["__metadata__"], dict):
        meta = header["__metadata__"]
        key = rng.choice(list(meta) or ["format"])
        meta[key] = rng.choice([_edge(rng), str(_edge(rng)), "[]", "{}"])
    return header, note


def _splice_repeat(text: bytes, note: str, rng: random.Random) -> bytes:
    """Repeats an entry or a field of the JSON text (what a dict cannot express)."""
    s = text.decode("utf-8", "replace")
    if note == "repeat-entry":
        m = re.search(r'("[^"]*"\s*:\s*\{[^{}]*\})', s)
        if m:
            return (s[: m.end()] + "," + m.group(1) + s[m.end() :]).encode()
    if note == "repeat-field":
        m = re.search(
            r'("(?:dtype|shape|data_offsets|format|version|numel)"\s*:\s*(?:"[^"]*"|\[[^\]]*\]|\d+))',
            s,
        )
        if m:
            return (s[: m.end()] + "," + m.group(1) + s[m.end() :]).encode()
    return text


def mutate_mask_meta(header: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A mutation of the ``tensors`` description or the format keys of a mask header."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return header
    op = rng.randrange(8)
    if op >= 6:  # provenance a user may have written: accepted, shown by summary()
        meta[rng.choice(["source", "note", *HOSTILE_NAMES])] = rng.choice(
            [*HOSTILE_NAMES, "x" * 3000, json.dumps({"a": [1, 2]})]
        )
    elif op == 0:
        meta[rng.choice(["format", "version", "bitorder"])] = rng.choice(
            ["rlmask", "1", "2", "0", "little", "big", "", "rlmask-patch"]
        )
    elif op == 1:
        meta.pop(rng.choice(["format", "version", "bitorder", "tensors"]), None)
    else:
        try:
            described = json.loads(str(meta.get("tensors", "{}")))
        except json.JSONDecodeError:
            described = {}
        if isinstance(described, dict) and described:
            name = rng.choice(list(described))
            d = described[name]
            if op == 2 and isinstance(d, dict):
                d[rng.choice(["shape", "numel", "dtype"])] = _edge(rng)
            elif op == 3 and isinstance(d, dict):
                d["numel"] = rng.choice(EDGE_INTS)
                d["shape"] = rng.choice([[2**32, 2**32], [d.get("numel", 0)], [2**63], []])
            elif op == 4:
                described[rng.choice([*HOSTILE_NAMES, "model.layers.9.w"])] = described.pop(name)
            else:
                described[name] = _edge(rng)
        meta["tensors"] = json.dumps(described) if rng.random() < 0.9 else "{" + str(_edge(rng))
    return header


def mutate_bytes(blob: bytes, rng: random.Random) -> bytes:
    """One raw mutation anywhere in the file."""
    b = bytearray(blob)
    op = rng.randrange(6)
    if op == 0 and b:  # flip bytes in the header region
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(len(b), 8 + 600))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # the header length
        n = struct.unpack("<Q", bytes(b[:8]).ljust(8, b"\0"))[0] if len(b) >= 8 else 0
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, 2**63, 2**64 - 1, 100_000_001, len(b)])
        b[:8] = struct.pack("<Q", new % 2**64)
    elif op == 2:  # cut
        del b[rng.randrange(len(b) + 1) :]
    elif op == 3:  # insert
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.choice([b"\0", b"{", b"}", b'"', b",", b"\xff\xfe", rng.randbytes(5)])
    elif op == 4:  # trailing bytes
        b += rng.randbytes(rng.randint(1, 9))
    elif op == 5 and len(b) > 9:  # delete one byte
        del b[rng.randrange(len(b))]
    return bytes(b)


def mutated_file(kind: str, rng: random.Random) -> bytes:
    """A whole mutated file: a checkpoint shard (``header``) or a mask (``mask``)."""
    header, data = make_checkpoint(rng) if kind == "header" else make_mask(rng)
    notes = []
    for _ in range(rng.randint(1, 3)):
        if kind == "mask" and rng.random() < 0.6:
            header = mutate_mask_meta(header, rng)
        else:
            header, note = mutate_structure(header, rng)
            notes.append(note)
    text = _header_bytes(header, rng)
    for note in notes:
        text = _splice_repeat(text, note, rng)
    blob = struct.pack("<Q", len(text)) + text + data
    if rng.random() < 0.35:
        blob = mutate_bytes(blob, rng)
    return blob


def mutated_index(rng: random.Random) -> tuple[list[tuple[str, bytes]], bytes]:
    """Two valid shards and a mutated ``model.safetensors.index.json`` for them."""
    shards, weight_map = [], {}
    for i in range(2):
        header, data = make_checkpoint(rng)
        header = {(f"s{i}.{k}" if k != "__metadata__" else k): v for k, v in header.items()}
        name = f"model-0000{i + 1}-of-00002.safetensors"
        shards.append((name, file_bytes(header, data, rng)))
        weight_map |= {k: name for k in header if k != "__metadata__"}
    index: Any = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    op = rng.randrange(8)
    keys = list(weight_map)
    if op == 0 and keys:
        weight_map[rng.choice(keys)] = rng.choice(
            [
                "../escape.safetensors",
                "/etc/passwd",
                "missing.safetensors",
                "",
                ".",
                "a/b.safetensors",
                "model.safetensors.index.json",
                5,
                None,
            ]
        )
    elif op == 1 and keys:
        weight_map.pop(rng.choice(keys))
    elif op == 2:
        weight_map[rng.choice(HOSTILE_NAMES)] = shards[0][0]
    elif op == 3:
        index["weight_map"] = _edge(rng)
    elif op == 4:
        index.pop("weight_map")
    elif op == 5:
        index = _edge(rng)
    elif op == 6 and keys:
        weight_map[rng.choice(keys)] = (
            shards[1][0] if weight_map[keys[0]] == shards[0][0] else shards[0][0]
        )
    text = json.dumps(index).encode()
    if op == 7 or rng.random() < 0.2:
        text = mutate_bytes(struct.pack("<Q", len(text)) + text, rng)[8:]
    return shards, text


# -------------------------------------------------------------------------------------------
# Running cases


@dataclass
class Tally:
    """Outcomes of a fuzzing run."""

    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    #: Files accepted by one of rlmask and the official safetensors reader and refused by the
    #: other: reason -> count, and a few examples.
    disagreements: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0

    def add(self, other: Tally) -> None:
        self.cases += other.cases
        self.outcomes.update(other.outcomes)
        self.errors.update(other.errors)
        self.crashes += other.crashes[:20]
        self.hangs += other.hangs[:20]
        self.disagreements.update(other.disagreements)
        self.slowest = max(self.slowest, other.slowest)


def _exercise_report(path: Path) -> None:
    import rlmask

    report = rlmask.diff(path, path, progress=False)
    d = report.to_dict()
    if any(c != 0 for c in d["changed"]) or any(t["changed"] != [0] for t in d["tensors"]):
        raise AssertionError("a file compared with itself has changed elements")
    report.summary()
    report.by_layer()
    report.by_module()
    report.to_json()


def _exercise_mask(path: Path) -> None:
    import rlmask

    m = rlmask.load_mask(path)
    m.summary()
    m.table()
    for name in m.names:
        m[name]
    if m.numel and rlmask.overlap(m, m).total["intersection"] != m.count:
        raise AssertionError("a mask's overlap with itself differs from its count")


def official_accepts(path: Path) -> tuple[bool, str]:
    """Whether the official safetensors reader opens the file (its header, fully)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            f.keys()
            f.metadata()
        return True, ""
    except Exception as e:  # the official reader raises several types
        return False, str(e).split("\n")[0][:120]


#: Why rlmask refuses files the official reader accepts, by the words of its message.
STRICTER = {
    "__metadata__ key": "a repeated __metadata__ key (the official reader keeps the last value)",
    "appears more than once": "a repeated tensor name (the official reader keeps the last entry)",
    "exceeds 2^63 - 1": "a dimension past 2^63-1 (reports and numpy hold shapes as int64)",
    "unknown dtype": "a dtype rlmask does not read (the official reader also knows F4, F6_*, "
    "F8_E8M0, the FNUZ FP8 variants and C64); refused rather than compared wrongly",
}


def explain(rlmask_error: str, official_error: str) -> str:
    """The category of a disagreement between the two readers, for the results table."""
    if rlmask_error:
        for words, why in STRICTER.items():
            if words in rlmask_error:
                return "rlmask refuses: " + why
        return "rlmask refuses, unexplained: " + re.sub(r"'[^']*'", "'…'", rlmask_error)[-100:]
    return "official refuses, rlmask accepts, unexplained: " + re.sub(r"\d+", "N", official_error)


def run_case(kind: str, seed: int, folder: Path, differential: bool = True) -> Tally:
    """Runs case ``seed`` of ``kind`` (``header``, ``index`` or ``mask``) in ``folder``."""
    import rlmask

    rng = random.Random(f"{kind}-{seed}")
    t = Tally(cases=1)
    if kind == "index":
        shards, text = mutated_index(rng)
        path = folder / f"ckpt{seed}"
        path.mkdir()
        for name, blob in shards:
            (path / name).write_bytes(blob)
        (path / "model.safetensors.index.json").write_bytes(text)
    else:
        path = folder / f"case{seed}.{'rlmask' if kind == 'mask' else 'safetensors'}"
        path.write_bytes(mutated_file(kind, rng))
    start = time.perf_counter()
    outcome, rl_error = "ok", ""
    try:
        (_exercise_mask if kind == "mask" else _exercise_report)(path)
    except rlmask.RlmaskError as e:
        outcome, rl_error = "error", str(e)
        t.errors[type(e).__name__] += 1
    except BaseException as e:  # a panic is a BaseException: everything else is a crash
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome = "crash"
        t.crashes.append(f"{kind} seed {seed}: {type(e).__name__}: {str(e)[:200]}")
    elapsed = time.perf_counter() - start
    t.slowest = elapsed
    if elapsed > HANG_SECONDS:
        t.hangs.append(f"{kind} seed {seed}: {elapsed:.2f} s")
        outcome = "hang" if outcome == "ok" else outcome
    t.outcomes[outcome] += 1
    if differential and kind == "header" and outcome in ("ok", "error"):
        ok, why = official_accepts(path)
        # "nothing to compare" and pairing refusals are about the comparison, not the file.
        file_refused = outcome == "error" and t.errors.get("PairingError", 0) == 0
        if ok == file_refused:
            t.disagreements[explain(rl_error if file_refused else "", why)] += 1
    return t


def run(kind: str, seeds: range, folder: Path, differential: bool = True) -> Tally:
    """Runs every seed of ``seeds``; files are written in ``folder`` and removed as it goes."""
    total = Tally()
    for seed in seeds:
        sub = folder / f"{kind}-{seed}"
        sub.mkdir()
        total.add(run_case(kind, seed, sub, differential))
        for p in sorted(sub.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        sub.rmdir()
    return total
