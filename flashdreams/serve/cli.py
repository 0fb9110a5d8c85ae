"""``flashdreams-serve``: live streaming sessions over WebSocket, with a browser viewer.

    flashdreams-serve <slug> [key=value ...] [--host 127.0.0.1] [--port 8000] [--token T]

The slug and overrides are those of ``flashdreams-run`` (same Hydra tree); the runner
fields give the defaults of a session (``runner.height`` / ``width`` / ``fps`` /
``seed`` / ``prompt_switch`` / ``save_latents``). Under ``torchrun`` every rank builds
the pipeline and steps the same sessions; rank 0 serves. Protocol: docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from flashdreams.serve.limits import TOKEN_ENV, ServeLimits

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Hosts served without a token."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="flashdreams-serve",
        description="Serve live streaming sessions of a FlashDreams pipeline over WebSocket "
        "(protocol: docs/serving.md), with a browser viewer at /.",
        epilog="Any other argument is a flashdreams-run override (slug first, then key=value).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    parser.add_argument(
        "--token",
        default=None,
        help=f"access token for every request (or ${TOKEN_ENV}); required off loopback",
    )
    parser.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality 1..100")
    parser.add_argument(
        "--send-buffer-bytes",
        type=int,
        default=256 * 1024,
        help="kernel send buffer per connection (default 262144; 0: the OS's auto-tuning). "
        "Small keeps a slow client's backlog short: the server drops its oldest frames instead",
    )
    for limit in fields(ServeLimits):
        parser.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=type(limit.default),
            default=limit.default,
            help=f"limit (default {limit.default})",
        )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return serve(args, rest)
    except (KeyError, ValueError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(" ".join(f"flashdreams-serve: error: {message}".split()), file=sys.stderr)
        return 2


def check_bind(host: str, token: str | None) -> None:
    if host not in LOCAL_HOSTS and not token:
        raise ValueError(
            f"--host {host} is reachable from other machines: give an access token with "
            f"--token or ${TOKEN_ENV} (or bind to 127.0.0.1)"
        )
    if token is not None and len(token) < 8:
        raise ValueError("the access token must have at least 8 characters")


def serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Compose, build, then serve (rank 0) or follow (other ranks); the exit code."""
    from flashdreams.launch.app import _launch_world_size
    from flashdreams.launch.cli import compose
    from flashdreams.launch.run_config import build_run_config
    from flashdreams.runner.preflight import validate_before_work

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]} (see flashdreams-serve --help)")
    slug = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if slug else rest
    run_config = build_run_config(compose(slug, overrides))
    validate_before_work(run_config, world_size=_launch_world_size(), first_frame=False)
    if run_config.parallel.decode != "rank0":
        raise ValueError(
            f"flashdreams-serve decodes on rank 0 (parallel.decode=rank0); "
            f"parallel.decode={run_config.parallel.decode} is for flashdreams-run"
        )
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})
    return _serve_built(args, run_config, limits, token, slug)


def _serve_built(args: Any, run_config: Any, limits: ServeLimits, token: str | None,
                 slug: str | None) -> int:  # fmt: skip
    import torch.distributed as dist
    from loguru import logger

    from flashdreams.core.distributed import shutdown_distributed
    from flashdreams.launch.app import configure_logging
    from flashdreams.launch.distributed import start_process_group
    from flashdreams.runner.runner import RunContext
    from flashdreams.serve.engine import ServeEngine
    from flashdreams.serve.metrics import ServeMetrics

    parallel = run_config.parallel
    context = start_process_group(parallel.backend, parallel.init_timeout_s)
    configure_logging(context.rank, None)
    plan = parallel.build_plan()
    output_root = _output_root(run_config)
    runner = run_config.runner.setup(
        pipeline_config=run_config.pipeline,
        context=RunContext(run_dir=output_root, rank=context.rank, world_size=context.world_size,
                           device=str(context.device), parallel=plan),
    )  # fmt: skip
    pipeline = runner.build_pipeline()
    latent_size = runner._latent_size(pipeline, run_config.runner.height, run_config.runner.width)
    metrics = ServeMetrics() if context.rank == 0 else None
    engine = ServeEngine(
        pipeline,
        max_sessions=limits.max_sessions,
        rank=context.rank,
        world_size=context.world_size,
        command_group=dist.group.WORLD if context.world_size > 1 else None,
        switch_mode=run_config.runner.prompt_switch,
        fps=run_config.runner.fps,
        saver_factory=_saver_factory(run_config, output_root) if context.rank == 0 else None,
        metrics=metrics,
        warmup=(
            _first_prompt(run_config),
            *latent_size,
            (run_config.runner.height, run_config.runner.width),
        ),
    )
    if context.rank != 0:
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, lambda *_: None)  # rank 0's plan says when to stop
        engine.follow()
        shutdown_distributed(context)
        return 0
    info = {
        "slug": slug or run_config.pipeline.name,
        "pipeline": run_config.pipeline.name,
        "world_size": context.world_size,
        "parallel_plan": plan.describe() if plan is not None else None,
        "device": str(context.device),
        "limits": asdict(limits),
        "defaults": {"height": run_config.runner.height, "width": run_config.runner.width,
                     "fps": run_config.runner.fps, "prompt": _first_prompt(run_config)},
        "seed": run_config.runner.seed,
        "auth": token is not None,
    }  # fmt: skip
    code = _run_server(args, engine, metrics, limits, token, info, runner, pipeline)
    if code == 0:
        shutdown_distributed(context)
    logger.info(f"flashdreams-serve stopped (exit code {code})")
    return code


def _first_prompt(run_config: Any) -> str:
    prompt = run_config.runner.prompt
    return prompt if isinstance(prompt, str) else prompt[0]


def _output_root(run_config: Any) -> Path:
    """Where ``save`` sessions go: ``runner.output_dir``, else ``outputs/<slug>/serve-<time>``."""
    import time

    if run_config.runner.output_dir is not None:
        return Path(run_config.runner.output_dir)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs") / run_config.pipeline.name / f"serve-{stamp}"


def _saver_factory(run_config: Any, output_root: Path) -> Any:
    from flashdreams.serve.engine import run_dir_for
    from flashdreams.serve.saving import SessionSaver

    def make(session_id: int, request: Any) -> SessionSaver:
        return SessionSaver(
            run_dir_for(output_root, session_id),
            run_config=run_config,
            prompt=request.spec.prompt,
            pixel_size=request.pixel_size,
            seed=request.spec.seed,
        )

    return make


def _run_server(args: Any, engine: Any, metrics: Any, limits: ServeLimits, token: str | None,
                info: dict[str, Any], runner: Any, pipeline: Any) -> int:  # fmt: skip
    import asyncio

    import uvicorn

    from flashdreams.serve.app import ServerState, build_app, stop_when_engine_done

    state = ServerState(
        engine=engine,
        metrics=metrics,
        limits=limits,
        info=info,
        latent_size=lambda height, width: runner._latent_size(pipeline, height, width),
        default_size=(runner.config.height, runner.config.width),
        token=token,
        jpeg_quality=args.jpeg_quality,
    )
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.send_buffer_bytes > 0:  # accepted connections inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.send_buffer_bytes)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue from here on, before uvicorn accepts them
    port = sock.getsockname()[1]
    app = build_app(state)
    config = uvicorn.Config(
        app,
        log_level="warning",
        ws_max_size=2 * limits.max_message_bytes,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = _GracefulServer(config, engine)
    state.server = server
    engine.start()

    async def main() -> None:
        watcher = asyncio.create_task(stop_when_engine_done(state))
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"flashdreams-serve: listening on http://{host}:{port}/", file=sys.stderr, flush=True)
        await server.serve(sockets=[sock])
        watcher.cancel()

    asyncio.run(main())
    engine.request_shutdown()
    engine.join(timeout=60)
    if engine.failure is not None:
        print(f"flashdreams-serve: error: {engine.failure}", file=sys.stderr)
        return 1
    return 0


def _graceful_server_class() -> Any:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """SIGTERM / Ctrl-C: the engine ends every session after the chunk in flight (the
        watcher then stops the server); a second Ctrl-C stops at once."""

        def __init__(self, config: Any, engine: Any) -> None:
            super().__init__(config)
            self.engine = engine
            self.stop_requested = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.stop_requested and sig == signal.SIGINT:
                self.should_exit = self.force_exit = True
                return
            self.stop_requested = True
            self.engine.request_shutdown()

    return GracefulServer


def _GracefulServer(config: Any, engine: Any) -> Any:  # noqa: N802 - a lazy class
    return _graceful_server_class()(config, engine)


if __name__ == "__main__":
    raise SystemExit(main())
