#!/usr/bin/env python3
"""Remote reading against ``curl`` (run by hand; needs nginx, which .ci/run installs).

nginx serves a pair of checkpoints on 127.0.0.1 (the tests' server, tests/servers.py); in turn,
interleaved, with the files warm in the page cache (the server's disk is not what is measured):

- ``curl``: the same bytes fetched by ``curl`` to ``/dev/null``, one process per shard file, all
  in parallel (the baseline: what the link and the server give);
- ``rlmask remote``: ``rlmask.diff`` of the two URLs (exact criterion: every byte fetched), in a
  fresh interpreter, opening included;
- ``rlmask local``: the same diff of the local files, for reference;
- ``rlmask sampled``: ``rlmask.diff(..., sample=0.01)`` of the URLs.

Each rlmask run also reports its peak memory: its anonymous memory plus the growth of the
machine's shared memory (``RssAnon`` + ``Shmem`` of /proc/meminfo over its start, sampled every
5 ms), where the fetched bytes live (an in-memory file); a local file's pages are the page
cache's, not counted.

Bytes are nginx's own count (its access log). With ``--limit-rate R`` (e.g. ``50m``) every
connection is limited to R bytes/s, like a remote link of many flows.

    python bench/bench_remote.py [--size-mb 512] [--shards 4] [--repeat 3] [--limit-rate 50m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import nginx

RUN = """
import sys, time, json, threading, rlmask
peak, done = [0], [False]
def shmem():  # the machine's shared memory, where the fetched bytes live (memfd)
    return next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("Shmem:"))
start = shmem()
def watch():
    while not done[0]:
        anon = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon"))
        peak[0] = max(peak[0], (anon + shmem() - start) * 1024)
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
kw = json.loads(sys.argv[3])
r = rlmask.diff(sys.argv[1], sys.argv[2], criterion="exact", progress=False, **kw)
s = time.perf_counter() - t
done[0] = True
print(json.dumps({"s": s, "changed": r.changed, "rss": peak[0]}))
"""


def make_pair(root: Path, size_mb: int, shards: int) -> None:
    """BF16 base and tuned (3% of elements changed), ``shards`` files each, with an index."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    per_shard = size_mb * 2**20 // shards // 2  # elements of BF16
    rows = 4096
    for side in ("base", "tuned"):
        (root / side).mkdir(parents=True)
    weight_map = {}
    for k in range(shards):
        n = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        a = rng.integers(0, 2**16, size=per_shard, dtype=np.uint16).reshape(rows, -1)
        b = a.copy()
        hit = rng.random(a.shape) < 0.03
        b[hit] ^= 1
        name = f"model.layers.{k}.mlp.up_proj.weight"
        save_file({name: a.view(np.float16)}, root / "base" / n)
        save_file({name: b.view(np.float16)}, root / "tuned" / n)
        weight_map[name] = n
    for side in ("base", "tuned"):
        (root / side / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map})
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512, help="each checkpoint's size")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit-rate", default=None, help="nginx limit_rate per connection")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "www"
        make_pair(root, args.size_mb, args.shards)
        files = sorted(root.glob("*/*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        with nginx(root, Path(d) / "nginx") as srv:
            if args.limit_rate:
                conf = Path(d) / "nginx" / "nginx.conf"
                text = conf.read_text().replace(
                    "sendfile on;", f"sendfile on; limit_rate {args.limit_rate};"
                )
                conf.write_text(text)
                subprocess.run(
                    ["kill", "-HUP", (Path(d) / "nginx" / "nginx.pid").read_text().strip()]
                )
                time.sleep(1)
            for f in files:  # warm the page cache
                f.read_bytes()
            rows: dict[str, list[float]] = {"curl": [], "remote": [], "local": [], "sampled": []}
            sent: dict[str, int] = {}
            rss: dict[str, int] = {"curl": 0}
            for _ in range(args.repeat):
                srv.clear_log()
                t = time.perf_counter()
                procs = [
                    subprocess.Popen(
                        ["curl", "-s", "-o", "/dev/null", f"{srv.url}/{f.relative_to(root)}"]
                    )
                    for f in files
                ]
                for p in procs:
                    p.wait()
                rows["curl"].append(time.perf_counter() - t)
                sent["curl"] = srv.sent()
                for key, a, b, kw in (
                    ("remote", f"{srv.url}/base", f"{srv.url}/tuned", {}),
                    ("local", str(root / "base"), str(root / "tuned"), {}),
                    ("sampled", f"{srv.url}/base", f"{srv.url}/tuned", {"sample": 0.01}),
                ):
                    srv.clear_log()
                    out = subprocess.run(
                        [sys.executable, "-c", RUN, a, b, json.dumps(kw)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    got = json.loads(out.stdout)
                    rows[key].append(got["s"])
                    rss[key] = max(rss.get(key, 0), got["rss"])
                    sent[key] = srv.sent()
    gb = total / 1e9
    print(f"pair: {gb:.2f} GB in {len(files)} files; best of {args.repeat}")
    curl = min(rows["curl"])
    for key, times in rows.items():
        best = min(times)
        rate = (sent[key] or total) / best / 1e9
        print(
            f"{key:8s} {best:7.3f} s  {rate:6.2f} GB/s  server sent {sent[key] / 1e9:6.3f} GB"
            f"  time/curl {best / curl:5.2f}x  peak anon+shmem {rss[key] / 2**20:5.0f} MiB"
        )


if __name__ == "__main__":
    main()
