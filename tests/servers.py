"""Real HTTP servers for the remote-reading tests: nginx (installed from the distribution's
packages by .ci/run) serving a folder on a free port, with its access log of every request's
range and bytes sent, and a TCP proxy in front of it that cuts connections (a flaky network)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
)

_CONF = """
worker_processes 2;
daemon off;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range" '
                      '"$http_authorization" $host';
    access_log {tmp}/access.log ranges;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    keepalive_requests 100000;
    types {{ application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        # A server that ignores Range: every request gets the whole file (200).
        location /noranges/ {{ alias {root}/; max_ranges 0; }}
        # A private repository: only this token may read it.
        location /private/ {{
            alias {root}/;
            if ($http_authorization != "Bearer hf_secret_token") {{ return 401; }}
        }}
        # A hub's resolve URLs: a redirect to the file on another host name (a CDN).
        location ~ ^/redirect/(.*)$ {{ return 302 http://localhost:{port}/$1; }}
        # A slow link, to interrupt a read in the middle.
        location /slow/ {{ alias {root}/; limit_rate 1m; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass
class Nginx:
    """A running nginx serving ``root`` at ``url``."""

    root: Path
    url: str
    log: Path

    def requests(self) -> list[tuple[str, str, int, int, str, str]]:
        """Every request logged so far: (method, path, status, body bytes, Range, auth)."""
        return [r[:6] for r in self.requests_by_host()]

    def requests_by_host(self) -> list[tuple[str, str, int, int, str, str, str]]:
        """:meth:`requests` with the host name each request was sent to."""
        out = []
        for line in self.log.read_text().splitlines():
            head, rng, _, auth, host = line.rsplit('"', 4)
            method, uri, status, sent = head.split()
            out.append((method, uri, int(status), int(sent), rng, auth, host.strip()))
        return out

    def sent(self, under: str = "/") -> int:
        """Body bytes sent for paths under ``under``."""
        return sum(n for _, uri, _, n, _, _ in self.requests() if uri.startswith(under))

    def clear_log(self) -> None:
        self.log.write_text("")


@contextlib.contextmanager
def nginx(root: Path, tmp: Path) -> Iterator[Nginx]:
    """nginx serving ``root`` on a free port of 127.0.0.1 until the block ends."""
    assert NGINX is not None, "nginx is not installed (.ci/run installs it)"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Run as root, nginx would drop its workers to 'nobody', who cannot read a test's files.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(_CONF.format(tmp=tmp, port=port, root=root, user=user))
    (tmp / "access.log").write_text("")
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening(port, proc)
        yield Nginx(root=root, url=f"http://127.0.0.1:{port}", log=tmp / "access.log")
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CuttingProxy:
    """A TCP proxy to ``target`` that cuts each of the first ``cuts`` connections after it has
    passed ``after`` bytes of the server's answer: a network that drops connections."""

    def __init__(self, target: int, cuts: int, after: int) -> None:
        self.target, self.cuts, self.after = target, cuts, after
        self.cut = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                doomed = self.cut < self.cuts
                self.cut += doomed
            threading.Thread(target=self._pipe, args=(client, doomed), daemon=True).start()

    def _pipe(self, client: socket.socket, doomed: bool) -> None:
        server = socket.create_connection(("127.0.0.1", self.target))

        def up() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    server.sendall(data)

        threading.Thread(target=up, daemon=True).start()
        passed = 0
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if doomed and passed + len(data) > self.after:
                    client.sendall(data[: max(0, self.after - passed)])
                    break
                client.sendall(data)
                passed += len(data)
        for s in (client, server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop = True
        self._sock.close()
