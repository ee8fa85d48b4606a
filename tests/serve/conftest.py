"""Shared setup of the server tests: the app over fake engines (fine-grained cases), and a tiny
trained run that real `perfml serve` processes open."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# the serve extra and httpx are pinned in the dev extra: a missing one fails here, never skips
import fastapi  # noqa: F401
import httpx
import prometheus_client  # noqa: F401
import pytest
import uvicorn  # noqa: F401

from tests.tiny_run import train_tiny_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory) -> Path:
    """A run directory of a 1-layer byte-level model trained 2 steps (max_seq_len 64)."""
    return train_tiny_run(
        tmp_path_factory.mktemp("serve_run"),
        ("bisect.py",),
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "max_seq_len": 64,
        },
        tokenizer="byte",
        seq_len=16,
        batch_size=2,
        max_steps=2,
        lr=3e-3,
        warmup_steps=1,
        eval_every=2,
        eval_batches=1,
        ckpt_every=2,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `perfml serve` process on a free loopback port."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        self.log = tmp / f"server-{self.port}.log"
        self._out = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perfml", "serve", *args, "--port", str(self.port)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def start_server(tmp_path):
    servers: list[Server] = []

    def start(*args: str, ready: bool = True) -> Server:
        server = Server([str(a) for a in args], tmp_path)
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    start.tmp = tmp_path
    yield start
    for server in servers:
        server.close()
