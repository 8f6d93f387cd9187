"""Shared by the benchmarks: run a small program in a fresh interpreter while sampling its
peak RSS and peak anonymous memory, the read floor every benchmark compares against, and
synthetic BF16 checkpoints."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

#: One pass that reads every byte of the given files (``readinto`` a reused 16 MiB buffer, one
#: thread per core) and prints its wall time. Arguments: the files.
READ_FLOOR = """
import sys, time, os, threading
files = sys.argv[1:]
t = time.perf_counter()
def reader(part):
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    for f in part:
        with open(f, "rb", buffering=0) as h:
            while h.readinto(view):
                pass
n = os.cpu_count() or 1
threads = [threading.Thread(target=reader, args=(files[i::n],)) for i in range(n)]
[th.start() for th in threads]
[th.join() for th in threads]
print(time.perf_counter() - t)
"""


# The least a comparison of memory-mapped files can do: every file memory-mapped with numpy and
# summed as uint64, the files dealt over one thread per core (numpy releases the GIL inside the
# sum), so every byte is touched once. Prints its own wall time (mapping included).
MMAP_FLOOR = """
import sys, os, threading, time
import numpy as np
files = sys.argv[1:]
def total(part, out, i):
    for path in part:
        m = np.memmap(path, dtype=np.uint8, mode="r")
        n = len(m) // 8 * 8
        out[i] ^= int(m[:n].view(np.uint64).sum())
t = time.perf_counter()
k = min(os.cpu_count() or 1, len(files))
out = [0] * k
threads = [threading.Thread(target=total, args=(files[i::k], out, i)) for i in range(k)]
[th.start() for th in threads]
[th.join() for th in threads]
print(time.perf_counter() - t)
"""


def evict(files: list[str]) -> None:
    """Drops the files from the page cache (after writing back anything dirty), so the next
    read of them comes from the disk. Needs root or the files' owner."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def write_bf16(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    """``folder/model.safetensors`` holding each uint16 array of ``tensors`` as a BF16 tensor of
    its shape (the header padded to 8 bytes, data in the order given)."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, bits in tensors.items():
        header[name] = {
            "dtype": "BF16",
            "shape": list(bits.shape),
            "data_offsets": [offset, offset + bits.nbytes],
        }
        offset += bits.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for bits in tensors.values():
            f.write(bits.tobytes())


def llama_shapes(
    hidden: int, inter: int, layers: int, vocab: int, kv_dim: int
) -> dict[str, tuple[int, ...]]:
    """Tensor names (Hugging Face Llama) and shapes of a llama-shaped model."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_program(code: str, args: list[str]) -> dict[str, Any]:
    """Runs ``python -c code *args``; its stdout's first field is its own wall time in
    seconds, the rest is returned as ``output``. Peak memory is sampled every 5 ms."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status(p.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    out, _ = p.communicate()
    stop.set()
    th.join()
    if p.returncode:
        raise SystemExit(f"benchmark program failed with exit code {p.returncode}")
    seconds, *rest = out.split()
    return {
        "seconds": float(seconds),
        "output": rest,
        "rss": peak["VmRSS"],
        "anon": peak["RssAnon"],
    }


def summarize(runs: list[dict[str, Any]], nbytes: int) -> dict[str, float]:
    """Best and median time, throughput of the best, and peak memory over all runs."""
    times = sorted(r["seconds"] for r in runs)
    return {
        "seconds": times[0],
        "median_seconds": times[len(times) // 2],
        "GBps": nbytes / times[0] / 1e9,
        "peak_rss_MB": max(r["rss"] for r in runs) / 1e6,
        "peak_anon_MB": max(r["anon"] for r in runs) / 1e6,
    }


def print_table(methods: dict[str, dict[str, float]]) -> None:
    print(
        f"{'method':<11} {'best s':>8} {'median s':>9} {'GB/s':>7} {'peak RSS MB':>12} "
        f"{'peak anon MB':>13}"
    )
    for m, r in methods.items():
        print(
            f"{m:<11} {r['seconds']:8.3f} {r['median_seconds']:9.3f} {r['GBps']:7.2f} "
            f"{r['peak_rss_MB']:12.0f} {r['peak_anon_MB']:13.0f}"
        )


def plain_venv(folder: Path) -> str:
    """A new virtual environment that sees this interpreter's packages (and an editable
    rlmask) through a path file of plain directory lines; returns its interpreter.

    Whole programs are timed in it as well as here, because an interpreter's own start-up
    depends on what its site-packages runs at every start: this project's machines carry a
    sandbox's ``.pth`` that imports certifi (about 50 ms at every start, `python -X importtime
    -c pass`), which a user's environment does not. Plain lines of a path file are only added
    to ``sys.path``; the ``.pth`` files inside those directories are not run."""
    import site

    import rlmask

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    paths = [*site.getsitepackages(), str(Path(rlmask.__file__).parent.parent)]
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "outer.pth").write_text("\n".join(paths) + "\n")
    return str(python)
