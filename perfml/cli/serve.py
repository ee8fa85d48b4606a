"""`perfml serve MODEL_DIR`: an OpenAI-compatible HTTP server (POST /v1/completions, streaming,
/v1/models, /healthz, /readyz, /metrics) over the continuous-batching engine, with A/B variants.

SIGTERM (or Ctrl-C) drains: /readyz and new requests answer 503, the requests already accepted
finish (up to --drain-timeout, then they end "cancelled"), and the process exits 0."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from perfml.cli._common import UsageError, add_dtype, positive_int

HELP = "serve a model over HTTP (OpenAI-compatible completions, A/B variants, metrics)"
BASE = "base"  # the variant name of MODEL_DIR


def variant_spec(text: str) -> tuple[str, str, float]:
    """NAME=DIR:WEIGHT (":WEIGHT" optional, default 1)."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        raise argparse.ArgumentTypeError(f"a variant looks like NAME=DIR:WEIGHT, got {text!r}")
    path, colon, weight = rest.rpartition(":")
    if not colon:
        path, weight = rest, "1"
    try:
        w = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the weight of {text!r} is not a number") from None
    if not w > 0:
        raise argparse.ArgumentTypeError(f"the weight of {text!r} must be > 0")
    return name, path, w


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a run directory (its latest checkpoint) or a model directory; the variant 'base'",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--max-batch", type=positive_int, default=16, help="requests decoded together per engine"
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        metavar="N",
        help="prompt + max_tokens limit per request (default: the model's max_seq_len)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a slot; more get 429 with Retry-After",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available, else cpu",
    )
    add_dtype(p)
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require Authorization: Bearer KEY on every path but /healthz and /readyz "
        "(default: no key)",
    )
    p.add_argument(
        "--request-log",
        metavar="FILE",
        help="append one JSON line per finished request, read by perfml ab-report (default: none)",
    )
    p.add_argument(
        "--log-prompts", action="store_true", help="include the prompt text in --request-log"
    )
    p.add_argument(
        "--weight",
        type=float,
        default=1.0,
        help="A/B weight of MODEL_DIR (the variant 'base') against the --variant weights",
    )
    p.add_argument(
        "--variant",
        dest="variants",
        type=variant_spec,
        action="append",
        default=[],
        metavar="NAME=DIR:WEIGHT",
        help="another model served beside MODEL_DIR, drawn by weight (sticky per 'user'); "
        "repeatable (default: none)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds the accepted requests get to finish",
    )


def _require_serve_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"perfml serve needs {', '.join(missing)}: pip install 'perfml[serve]'")


def _open(name: str, path: str, weight: float, args: argparse.Namespace, dev: Any) -> Any:
    from pathlib import Path

    from perfml.cli._common import dtype, load_model, model_errors
    from perfml.cli.generate import cast_floats
    from perfml.serve.app import Variant
    from perfml.serve.engine import Engine

    loaded = load_model(path, "latest")
    try:
        tokenizer = loaded.tokenizer()
    except (*model_errors(), ValueError) as exc:
        raise UsageError(str(exc)) from None
    model = loaded.model
    cast_floats(model, dtype(args.dtype, dev))
    try:
        engine = Engine(
            model,
            max_batch=args.max_batch,
            max_context=args.max_context,
            max_queue=args.max_queue,
            device=dev,
        )
    except ValueError as exc:
        raise UsageError(f"variant {name} ({path}): {exc}") from None
    return Variant(name, engine, tokenizer, weight=weight, model_id=Path(path).name or path)


def run(args: argparse.Namespace) -> int:
    _require_serve_extra()
    import asyncio

    import uvicorn

    from perfml.cli._common import device
    from perfml.serve.app import build_app, drain

    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.weight > 0:
        raise UsageError(f"--weight must be > 0, got {args.weight}")
    if args.drain_timeout < 0:
        raise UsageError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    specs = [(BASE, args.model_dir, args.weight), *args.variants]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"variant names must differ, got {names}")
    dev = device(None if args.device == "auto" else args.device)
    variants = {name: _open(name, path, w, args, dev) for name, path, w in specs}
    started: list[Any] = []
    try:
        for v in variants.values():
            v.engine.start()
            started.append(v.engine)
        app = build_app(
            variants,
            api_key=args.api_key,
            request_log=args.request_log,
            log_prompts=args.log_prompts,
        )

        class DrainingServer(uvicorn.Server):
            """SIGTERM/SIGINT drains the app before uvicorn stops; a second one forces."""

            drain_task: asyncio.Task | None = None

            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.drain_task is not None:
                    self.force_exit = self.should_exit = True
                    return
                loop = asyncio.get_running_loop()
                self.drain_task = loop.create_task(self._drain())

            async def _drain(self) -> None:
                print("perfml serve: draining", file=sys.stderr, flush=True)
                try:
                    await drain(app, args.drain_timeout)
                finally:
                    self.should_exit = True

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                if self.started:
                    port = self.servers[0].sockets[0].getsockname()[1]
                    host = f"[{args.host}]" if ":" in args.host else args.host
                    shares = ", ".join(
                        f"{n} {100 * s:.0f}%" for n, s in app.state.perfml.router.shares.items()
                    )
                    print(f"perfml serve: http://{host}:{port} ready ({shares}; {dev})", flush=True)

        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=max(5.0, args.drain_timeout),
        )
        server = DrainingServer(config)
        try:
            server.run()
        except SystemExit:  # uvicorn's answer to a startup failure, logged above
            server.started = False
        if not server.started:
            raise UsageError(
                f"could not listen on {args.host}:{args.port} (uvicorn's error is above)"
            )
    finally:
        for engine in started:
            engine.stop(drain=False, timeout=5.0)
    return 0
