"""A Mooncake Store on this machine's loopback, for trying the remote tier, tests, benchmarks and the notebook.

``LocalMaster``: ``mooncake_master`` (the index) on a free 127.0.0.1 port. ``LocalPoolNode``: ``mooncake_client``,
Mooncake's own process that only lends memory to the pool (what a memory node runs in production), so that blocks
outlive the servers that wrote them. Both binaries come with ``longseq[remote]``; every wait is bounded, and
``stop()`` kills the process. Production runs the same binaries on real hosts (README, remote tier).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 15.0


def mooncake_binary(name: str) -> Path:
    """The Mooncake package's own executable ``name`` (its console scripts only exec it), found without importing
    the package; else the console script beside this Python. May not exist (checked when started)."""
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.origin:
        inside = Path(spec.origin).parent / name
        if inside.exists():
            return inside
    return Path(sys.executable).with_name(name)


class MooncakeStartError(RuntimeError):
    """A Mooncake binary is missing, exited, or did not listen in time (the message has its log's tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    path = mooncake_binary(name)
    if not path.exists():
        raise MooncakeStartError(f"{name} not found (looked in the mooncake package and beside {sys.executable}): "
                                 f"pip install 'longseq[remote]' (bash scripts/setup.sh)")
    if not os.access(path, os.X_OK):  # wheels installed with --target may lose the mode bits
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)


class _Service:
    """One process whose output goes to ``log_path``; ``_start`` waits until it accepts TCP on ``port``."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name, self.log_path, self.proc = name, Path(log_path), None

    def _start(self, argv: list[str], port: int) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MooncakeStartError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise MooncakeStartError(f"{self.name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S} s: "
                                 f"{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-2000:].decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class LocalMaster(_Service):
    """``mooncake_master`` on a free 127.0.0.1 port; ``start()`` again after ``stop()`` reuses the port (a
    restarted master starts empty)."""

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__("mooncake_master", Path(log_dir) / "mooncake_master.log")
        self.port = free_port()
        self.metrics_port = free_port()  # its default (9003) would clash between two masters on one machine
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.log_path.with_name(f"mooncake_master{self.starts}.log")
        self._start([_binary("mooncake_master"), f"--rpc_port={self.port}", "--rpc_address=127.0.0.1",
                     f"--metrics_port={self.metrics_port}"], self.port)


class LocalPoolNode(_Service):
    """``mooncake_client`` lending ``segment_bytes`` of its memory to ``master``'s pool (started on creation)."""

    def __init__(self, master: LocalMaster, segment_bytes: int, log_dir: str | Path) -> None:
        super().__init__("mooncake_client", Path(log_dir) / f"mooncake_pool_{master.port}.log")
        self.port = free_port()
        self._start([_binary("mooncake_client"), f"--master_server_address={master.address}", "--metadata_server=P2PHANDSHAKE",
                     f"--global_segment_size={int(segment_bytes)}", "--host=127.0.0.1", f"--port={self.port}"],
                    self.port)
