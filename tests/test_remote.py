"""Checkpoints read over HTTP range requests (issue 30), against a real server: nginx on a free
port, serving checkpoints written by the official safetensors library, plainly and in the hub's
URL layout. The oracle of every remote figure is the same diff of the local files; the oracle
of the bytes is nginx's own access log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from rlmask.cli import cli
from servers import CuttingProxy, Nginx, nginx

LAYERS = 4


def _write(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """A checkpoint of ``shards`` files with an index (or one model.safetensors), and a config."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            f = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, folder / f)
            weight_map.update(dict.fromkeys(part, f))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _models(root: Path, shards: int, rows: int = 256, seed: int = 0) -> list[Path]:
    """A base and three RL-like steps of it (a tenth of the rows change at 3x the rate)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        f"model.layers.{i}.{m}.weight": torch.randn(rows, 512, generator=g).to(torch.bfloat16)
        for i in range(LAYERS)
        for m in ("self_attn.q_proj", "mlp.up_proj")
    }
    base["model.embed_tokens.weight"] = torch.randn(1000, 64, generator=g).to(torch.bfloat16)
    out = [root / "base"]
    _write(out[0], base, shards)
    current = base
    for step in (1, 2, 3):
        nxt = {}
        for k, v in current.items():
            rate = torch.full((v.shape[0], 1), 0.03)
            rate[: v.shape[0] // 10] = 0.09
            hit = torch.rand(v.shape, generator=g) < rate
            w = v.clone()
            w[hit] = (w[hit].float() + 0.05 * torch.randn(int(hit.sum()), generator=g)).to(
                torch.bfloat16
            )
            nxt[k] = w
        current = nxt
        out.append(root / f"step-{step}")
        _write(out[-1], current, shards)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, list[Path]]]:
    root = tmp_path_factory.mktemp("www")
    local = _models(root, shards=3)
    # The hub's layout: /ORG/NAME/resolve/REVISION/FILE.
    hub = root / "org" / "model" / "resolve" / "main"
    hub.parent.mkdir(parents=True)
    hub.symlink_to(local[-1], target_is_directory=True)
    with nginx(root, tmp_path_factory.mktemp("nginx")) as srv:
        yield srv, local


def _figures(report: rlmask.DiffReport) -> dict:
    d = report.to_dict()
    for k in ("base", "tuned", "elapsed_s", "notes", "warnings"):
        d.pop(k, None)
    return d


def _tensor_bytes(folders: list[Path]) -> int:
    return sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))


def test_a_remote_diff_is_the_local_diff_and_fetches_each_byte_once(
    served: tuple[Nginx, list[Path]],
) -> None:
    srv, local = served
    want = rlmask.diff(local[0], local[3], progress=False)
    srv.clear_log()
    got = rlmask.diff(f"{srv.url}/base", f"{srv.url}/step-3/", progress=False)
    assert _figures(got) == _figures(want)
    assert want.changed > 0
    # Every byte of every shard exactly once (the headers, then each tensor's bytes), and one
    # byte per shard at the end, asking whether the file is still the one read.
    log = srv.requests()
    shard_bytes = sum(n for _, uri, _, n, _, _ in log if uri.endswith(".safetensors"))
    assert shard_bytes == _tensor_bytes([local[0], local[3]]) + 6, log
    assert all(
        status == 206 and rng.startswith("bytes=")
        for _, uri, status, _, rng, _ in log
        if uri.endswith(".safetensors")
    )
    # The index and config of each side, fetched once each.
    side = [uri for _, uri, _, _, _, _ in log if uri.endswith(".json")]
    assert sorted(side) == sorted(
        f"/{s}/{f}"
        for s in ("base", "step-3")
        for f in ("config.json", "model.safetensors.index.json")
    )


def test_one_file_by_url_and_the_cli(served: tuple[Nginx, list[Path]], tmp_path: Path) -> None:
    srv, local = served
    shard = "model-00002-of-00003.safetensors"
    want = rlmask.diff(local[0] / shard, local[1] / shard, progress=False)
    got = rlmask.diff(f"{srv.url}/base/{shard}", f"{srv.url}/step-1/{shard}", progress=False)
    assert _figures(got) == _figures(want)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        cli, ["diff", f"{srv.url}/base", f"{srv.url}/step-1", "--format", "json", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["changed"] == [rlmask.diff(local[0], local[1]).changed]


def test_hf_urls_use_the_hub_layout_endpoint_and_token(
    served: tuple[Nginx, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, local = served
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    want = rlmask.diff(local[0], local[3], progress=False)
    srv.clear_log()
    got = rlmask.diff(f"{srv.url}/base", "hf://org/model@main", progress=False)
    assert _figures(got) == _figures(want)
    hub = [r for r in srv.requests() if r[1].startswith("/org/model/resolve/main/")]
    assert hub and all(auth == "Bearer hf_secret_token" for *_, auth in hub)
    # A private repository: the token opens it; a wrong one gets one line that says what to
    # do, and never shows the token.
    monkeypatch.setenv("HF_ENDPOINT", srv.url + "/private")
    got = rlmask.diff(f"{srv.url}/base", "hf://org/model", progress=False)
    assert _figures(got) == _figures(want)
    # Offline mode is honoured: no network for hf:// then.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(rlmask.CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        rlmask.diff(f"{srv.url}/base", "hf://org/model", progress=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    r = CliRunner().invoke(cli, ["diff", f"{srv.url}/base", "hf://org/model"])
    assert r.exit_code != 0
    line = r.output.strip()
    assert "\n" not in line and "401" in line and "HF_TOKEN" in line, line
    assert "hf_wrong_token" not in r.output and "Traceback" not in r.output


def test_a_redirect_is_followed_once_per_file_and_never_given_the_token(
    served: tuple[Nginx, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the hub's resolve URLs do, /redirect/... answers 302 to the file on another host name
    (a CDN): each shard's later range requests go to that location directly (one round trip,
    not two), and the token sent to the resolve URL never reaches the other host."""
    srv, local = served
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", srv.url + "/redirect")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    # A sample: many range requests per shard.
    want = rlmask.diff(local[0], local[3], sample=0.3, seed=3, progress=False)
    srv.clear_log()
    got = rlmask.diff(f"{srv.url}/base", "hf://org/model", sample=0.3, seed=3, progress=False)
    assert _figures(got) == _figures(want)
    log = srv.requests_by_host()
    shard = [r for r in log if r[1].endswith(".safetensors") and "resolve" in r[1]]
    redirected = [r for r in shard if r[1].startswith("/redirect/")]
    direct = [r for r in shard if not r[1].startswith("/redirect/")]
    assert all(r[2] == 302 and r[5] == "Bearer hf_secret_token" for r in redirected)
    assert all(r[6] == "localhost" and r[5] == "-" for r in direct), direct
    # Through the redirect: each shard's opening and final check, and the first requests in
    # flight before one came back (16 per file at most); every other request goes direct.
    assert len(redirected) <= 3 * (2 + 16) and len(direct) > 4 * len(redirected), (
        len(redirected),
        len(direct),
    )


def test_a_sampled_remote_diff_reads_its_sample_only(served: tuple[Nginx, list[Path]]) -> None:
    srv, local = served
    want = rlmask.diff(local[0], local[2], sample=0.05, seed=7, progress=False)
    srv.clear_log()
    got = rlmask.diff(f"{srv.url}/base", f"{srv.url}/step-2", sample=0.05, seed=7, progress=False)
    assert _figures(got) == _figures(want)
    sent = sum(n for _, uri, _, n, _, _ in srv.requests() if uri.endswith(".safetensors"))
    data = _tensor_bytes([local[0], local[2]])
    first = 6 * 65536  # each shard's first request: its header and what follows it
    read = got.to_dict()["sample"]["bytes_read"]
    assert read <= 0.06 * data
    assert sent <= read + first, (sent, read, data)


def test_faults_are_one_line_errors(served: tuple[Nginx, list[Path]]) -> None:
    srv, _ = served
    runner = CliRunner()
    cases = [
        (f"{srv.url}/nothing-here", "no model.safetensors.index.json"),
        (f"{srv.url}/base/model-00009-of-00003.safetensors", "404"),
        (f"{srv.url}/noranges/base", "ignores range requests"),
        (f"{srv.url}/private/base", "401"),
        ("http://127.0.0.1:1/base", "base"),
    ]
    for url, said in cases:
        t = time.monotonic()
        r = runner.invoke(cli, ["diff", url, f"{srv.url}/step-1"])
        assert r.exit_code != 0, (url, r.output)
        assert "Traceback" not in r.output and r.output.count("\n") == 1, r.output
        assert said in r.output, r.output
        assert time.monotonic() - t < 60


def test_dropped_connections_are_retried(
    served: tuple[Nginx, list[Path]],
) -> None:
    srv, local = served
    port = int(srv.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cuts=6, after=300_000)
    try:
        url = f"http://127.0.0.1:{proxy.port}"
        got = rlmask.diff(f"{url}/base", f"{url}/step-3", progress=False)
    finally:
        proxy.close()
    assert proxy.cut >= 6
    assert _figures(got) == _figures(rlmask.diff(local[0], local[3], progress=False))


def test_a_file_replaced_during_the_read_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "www"
    local = _models(root, shards=1, rows=512)
    with nginx(root, tmp_path / "ng") as srv:
        done: list[BaseException | None] = []

        def run() -> None:
            try:
                rlmask.diff(f"{srv.url}/slow/base", f"{srv.url}/slow/step-1", progress=False)
                done.append(None)
            except BaseException as e:  # handed to the test thread
                done.append(e)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.5)
        # Same size, other bytes (as a re-upload would be): nginx's ETag changes with it.
        f = local[1] / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-4096:] = bytes(4096)
        tmp = f.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.utime(tmp, (time.time() + 5, time.time() + 5))
        tmp.replace(f)
        t.join(120)
    assert isinstance(done[0], rlmask.CheckpointChangedError), done
    assert "changed while it was being read" in str(done[0])


def test_ctrl_c_stops_a_remote_read_within_a_second(tmp_path: Path) -> None:
    root = tmp_path / "www"
    _models(root, shards=1, rows=4096)
    with nginx(root, tmp_path / "ng") as srv:
        p = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from rlmask.cli import main; main()",
                "diff",
                f"{srv.url}/slow/base",
                f"{srv.url}/slow/step-1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assert p.poll() is None
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130 and time.monotonic() - sent < 1.5, err


def test_trajectory_and_spectrum_read_remote_runs(served: tuple[Nginx, list[Path]]) -> None:
    srv, local = served
    urls = [f"{srv.url}/{p.name}" for p in local]
    want = rlmask.trajectory(local[0], local[1:], progress=False).to_dict()
    got = rlmask.trajectory(urls[0], urls[1:], progress=False).to_dict()
    for d in (want, got):
        d.pop("base", None)
        d.pop("checkpoints", None)
        d.pop("elapsed_s", None)
    assert json.dumps(got, sort_keys=True, default=str).replace(srv.url, "") == json.dumps(
        want, sort_keys=True, default=str
    ).replace(str(local[0].parent), "")
    s_want = rlmask.spectrum(local[0], local[3], progress=False).tensors
    s_got = rlmask.spectrum(urls[0], urls[3], progress=False).tensors
    num = [c for c, t in s_want.schema.items() if t.is_numeric()]
    assert np.allclose(s_got.select(num).to_numpy(), s_want.select(num).to_numpy(), equal_nan=True)


def test_a_ray_survey_streams_its_pairs(served: tuple[Nginx, list[Path]], tmp_path: Path) -> None:
    import ray

    srv, local = served
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        "".join(
            f'[[pair]]\nname = "s{k}"\nbase = "{srv.url}/base"\ntuned = "{srv.url}/step-{k}"\n'
            for k in (1, 2, 3)
        )
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = rlmask.survey(manifest, cache="", executor="ray")
    finally:
        ray.shutdown()
    for k in (1, 2, 3):
        row = got.tensors.filter(got.tensors["name"] == f"s{k}")
        assert row["changed"].to_list()[0] == rlmask.diff(local[0], local[k]).changed
