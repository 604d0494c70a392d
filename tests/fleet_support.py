"""Helpers for the fleet tests: private redis-servers and child processes.

Every test gets a redis-server of its own on a free port (``--save "" --appendonly no``: a
restart loses everything, which is exactly the case fleet mode must survive), never the
shared one on 6379. Under ``CI`` a missing binary fails the test; elsewhere it skips and says
how to get one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(msg: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


class RedisServer:
    """One private redis-server: start, SIGSTOP/SIGCONT, kill, restart on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("redis-server not found: apt-get install redis-server (or put it on PATH)")
        self.binary = str(binary)
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="poolguard-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        _unavailable(f"redis-server did not start on port {self.port}")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=10)

    def pause(self) -> None:
        """SIGSTOP: a hung Redis (connections accepted by the kernel, nothing answered)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port: every key is gone (no persistence)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(pred: Callable[[], object], timeout: float = 20.0, every: float = 0.02) -> bool:
    """Poll ``pred`` until truthy; generous bounds: 2 cores are shared by many test runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def fleet_keys(server: RedisServer, name: str) -> dict[str, Any]:
    """What the fleet ``name`` holds in Redis: leases per member and quarantine entries."""
    c = server.client()
    try:
        p = f"poolguard:{{{name}}}:"
        return {
            "leases": {k: int(v) for k, v in c.hgetall(p + "leases").items()},
            "quarantined": sorted(k[len(p) + 2 :] for k in c.scan_iter(p + "q:*")),
        }
    finally:
        c.close()
