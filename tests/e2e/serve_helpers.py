"""Helpers for the flashdreams-serve tests: a real server process and a WebSocket client."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"listening on (http://\S+)/")


def serve_command() -> list[str]:
    return [sys.executable, "-m", "flashdreams.serve"]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    """``http://host:port`` (no trailing slash)."""
    token: str | None = None
    log: list[str] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        url = self.url.replace("http://", "ws://") + "/v1/sessions"
        return url + (f"?token={self.token}" if self.token else "")

    def get(self, path: str, token: str | None = "default") -> tuple[int, str]:
        """(status, body) of ``GET path``; ``token="default"`` sends the server's token."""
        token = self.token if token == "default" else token
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics:\n{text}"
        return float(match.group(1))

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_server(args: list[str], cwd: Path, *, token: str | None = None,
                 prefix: list[str] | None = None, timeout: float = 180) -> ServerProcess:  # fmt: skip
    """Start ``flashdreams-serve args`` on a free port; returns once it listens."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # Under a launcher prefix (torchrun) the module runs in the launcher's python.
    program = ["-m", "flashdreams.serve"] if prefix else serve_command()
    command = (prefix or []) + program + [*args, "--port", "0"]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    log: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            log.append(line)
            match = LISTENING.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout)
    if not found:
        process.kill()
        raise AssertionError("server did not start:\n" + "".join(log))
    url = found[0].replace("0.0.0.0", "127.0.0.1")
    return ServerProcess(process=process, url=url, token=token, log=log)


@dataclass
class SessionRecord:
    """Everything one client received, in order."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    """(chunk index, JPEG bytes)."""

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    def index_of(self, kind: str, **match: Any) -> int:
        for index, message in enumerate(self.messages):
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                return index
        raise AssertionError(f"no {kind} {match} in {self.messages}")


def connect(server: ServerProcess, **options: Any) -> Any:
    from websockets.sync.client import connect as ws_connect

    return ws_connect(server.ws_url, open_timeout=30, **options)


def run_session(server: ServerProcess, start: dict[str, Any], *, on_message=None,
                websocket=None, timeout: float = 120) -> SessionRecord:  # fmt: skip
    """Send ``start``, read until ``ended``; ``on_message(ws, message, record)`` may reply."""
    if websocket is None:
        with connect(server) as ws:
            return run_session(server, start, on_message=on_message, websocket=ws,
                               timeout=timeout)  # fmt: skip
    record = SessionRecord()
    websocket.send(json.dumps({"type": "start", **start}))
    chunk_index = None
    deadline = time.monotonic() + timeout
    while True:
        received = websocket.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(received, bytes):
            record.frames.append((chunk_index, received))
            continue
        message = json.loads(received)
        record.messages.append(message)
        if message["type"] == "chunk":
            chunk_index = message["index"]
        if on_message is not None:
            on_message(websocket, message, record)
        if message["type"] == "ended" or (
            message["type"] == "error" and not record.of_type("started")
        ):
            return record


def decode_jpeg(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"))
