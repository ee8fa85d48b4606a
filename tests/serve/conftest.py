"""Shared setup of the server tests: the app over fake engines (fine-grained cases), and a tiny
trained run that real `perfml serve` processes open."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory) -> Path:
    """A run directory of a 1-layer byte-level model trained 2 steps (max_seq_len 64)."""
    import torch

    from perfml.train import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("serve_run")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus.txt"
    corpus.write_text((stdlib / "bisect.py").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = TrainConfig(
        model="tiny",
        model_args={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "max_seq_len": 64,
        },
        fused=False,
        data=str(corpus),
        cache_dir=str(root / "cache"),
        tokenizer="byte",
        seq_len=16,
        batch_size=2,
        max_steps=2,
        lr=3e-3,
        warmup_steps=1,
        precision="fp32",
        device="cpu",
        eval_every=2,
        eval_batches=1,
        ckpt_every=2,
        progress=False,
        out_dir=str(root / "run"),
    )
    try:
        Trainer(config).fit()
    finally:
        torch.set_num_threads(threads)
    return root / "run"


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
