"""The web side of ``flashdreams-serve``: a Starlette app on rank 0 (protocol in docs/serving.md).

Routes: ``GET /`` (the viewer), ``GET /healthz``, ``GET /v1/info``, ``GET /metrics`` and
the WebSocket ``/v1/sessions``. One connection runs one session at a time. Requests
go to the :class:`~flashdreams.serve.engine.ServeEngine` thread; what it produces
comes back through :class:`Client`, whose bounded frame queue drops the oldest
chunks (counted) when the client reads slower than the session generates, so
generation never waits for a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from flashdreams.serve.engine import OpenSpec, ServeEngine, SessionRequest, StartRequest
from flashdreams.serve.limits import CLIENT_COMMANDS, ServeLimits
from flashdreams.serve.metrics import ServeMetrics


class ProtocolError(ValueError):
    """A client message the server refuses; the message goes back as an ``error``."""


@dataclass
class ServerState:
    """What every request handler shares (rank 0)."""

    engine: ServeEngine
    metrics: ServeMetrics
    limits: ServeLimits
    info: dict[str, Any]
    """``GET /v1/info``: slug, world size, parallel plan, limits, defaults."""
    latent_size: Any
    """``latent_size(height, width) -> (h, w)``; ``ValueError`` naming sizes that work."""
    default_size: tuple[int, int]
    """``(height, width)`` when ``start`` has none (``runner.height`` / ``runner.width``)."""
    token: str | None = None
    """Required on every request when set."""
    jpeg_quality: int = 85
    clients: set[Client] = field(default_factory=set)
    server: Any = None
    """The uvicorn server (``should_exit`` ends it)."""


def encode_jpegs(frames: Any, quality: int) -> list[bytes]:
    """``[T, H, W, 3]`` uint8 -> one JPEG per frame (simplejpeg, else Pillow)."""
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None
    out = []
    for frame in frames:
        if simplejpeg is not None:
            out.append(simplejpeg.encode_jpeg(frame, quality=quality, colorspace="RGB"))
        else:
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
            out.append(buffer.getvalue())
    return out


class Client:
    """One WebSocket connection: the engine's listener for its session and its send queue.

    The listener methods run on the engine thread and only hand over to the event
    loop; everything else runs on the event loop.
    """

    def __init__(self, websocket: Any, state: ServerState) -> None:
        self.websocket = websocket
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.items: deque[tuple[str, Any, Any]] = deque()
        self.queued_frames = 0
        self.dropped_frames = 0
        self.wakeup = asyncio.Event()
        self.connected = True
        self.session_id: int | None = None
        self.starting = False
        self.chunks_published = 0

    # ---- listener (engine thread) --------------------------------------------------
    def opened(self, session_id: int, info: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self._opened, session_id, info)

    def chunk(self, session_id: int, message: dict[str, Any], frames: Any) -> None:
        self.loop.call_soon_threadsafe(self._push_chunk, session_id, message, frames)

    def applied(self, request_id: Any, command: str, chunk: int) -> None:
        message = {"type": "applied", "id": request_id, "command": command, "chunk": chunk}
        self.loop.call_soon_threadsafe(self.send_json, message)

    def ended(self, reason: str) -> None:
        self.loop.call_soon_threadsafe(self._ended, reason)

    def error(self, message: str) -> None:
        self.loop.call_soon_threadsafe(self.send_error, message)

    # ---- event loop ---------------------------------------------------------------------
    def _opened(self, session_id: int, info: dict[str, Any]) -> None:
        self.starting = False
        self.session_id = session_id
        if not self.connected:
            self.state.engine.submit(SessionRequest(session_id, "disconnect"))
            return
        self.send_json({"type": "started", "session": session_id, **info})

    def _ended(self, reason: str) -> None:
        self.starting = False
        self.send_json({"type": "ended", "session": self.session_id, "reason": reason})
        self.session_id = None

    def send_json(self, message: dict[str, Any]) -> None:
        if self.connected:
            self.items.append(("json", message, None))
            self.wakeup.set()

    def send_error(self, message: str) -> None:
        self.state.metrics.error()
        self.send_json({"type": "error", "message": message})

    def _push_chunk(self, session_id: int, message: dict[str, Any], frames: Any) -> None:
        self.chunks_published = message["index"] + 1
        if not self.connected:
            return
        message = {"type": "chunk", "session": session_id, **message}
        num_frames = 0 if frames is None else len(frames)
        self.items.append(("chunk", message, frames))
        self.queued_frames += num_frames
        self._drop_oldest()
        self.wakeup.set()

    def _drop_oldest(self) -> None:
        """Drop the oldest queued chunks (not the newest) while too many frames wait."""
        limit = self.state.limits.max_queued_frames
        while self.queued_frames > limit:
            chunks = [i for i, item in enumerate(self.items) if item[0] == "chunk"]
            if len(chunks) <= 1:
                return
            kind, message, frames = self.items[chunks[0]]
            del self.items[chunks[0]]
            self.queued_frames -= len(frames)
            self.dropped_frames += len(frames)
            self.state.metrics.frames(dropped=len(frames))

    async def send_loop(self) -> None:
        """Send queued messages until the connection closes."""
        from starlette.websockets import WebSocketDisconnect

        try:
            await self._send_queued()
        except (OSError, RuntimeError, WebSocketDisconnect):
            pass  # the client went away; the receiving side cleans up

    async def _send_queued(self) -> None:
        """A chunk is its message, then its JPEG frames as binary messages."""
        quality = self.state.jpeg_quality
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.items:
                kind, message, frames = self.items.popleft()
                if kind == "json":
                    await self.websocket.send_text(json.dumps(message))
                    continue
                num_frames = 0 if frames is None else len(frames)
                self.queued_frames -= num_frames
                jpegs = (
                    [] if frames is None else await asyncio.to_thread(encode_jpegs, frames, quality)
                )
                message["num_frames"] = len(jpegs)
                if frames is not None:
                    message["height"], message["width"] = int(frames.shape[1]), int(frames.shape[2])
                message["dropped_frames"] = self.dropped_frames
                await self.websocket.send_text(json.dumps(message))
                for jpeg in jpegs:
                    await self.websocket.send_bytes(jpeg)
                self.state.metrics.frames(sent=len(jpegs))

    async def flush(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until everything queued was sent."""
        deadline = self.loop.time() + timeout_s
        while self.items and self.connected and self.loop.time() < deadline:
            await asyncio.sleep(0.02)

    def disconnected(self) -> None:
        """The client went away: close its session after the grace period."""
        self.connected = False
        self.items.clear()
        if self.session_id is not None:
            request = SessionRequest(self.session_id, "disconnect")
            self.loop.call_later(
                self.state.limits.disconnect_grace_s, self.state.engine.submit, request
            )

    # ---- requests ---------------------------------------------------------------------
    def handle_text(self, text: str) -> None:
        limits = self.state.limits
        size = len(text.encode("utf-8"))
        if size > limits.max_message_bytes:
            raise ProtocolError(
                f"message too large: {size} bytes, over the limit "
                f"max_message_bytes={limits.max_message_bytes}"
            )
        try:
            message = json.loads(text)
        except json.JSONDecodeError as error:
            raise ProtocolError(f"malformed JSON: {error}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ProtocolError("each message must be a JSON object with a string 'type' field")
        kind = message["type"]
        if kind not in CLIENT_COMMANDS:
            raise ProtocolError(
                f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_COMMANDS)}"
            )
        request_id = message.get("id")
        if kind == "start":
            self._start(message, request_id)
            return
        if self.session_id is None:
            raise ProtocolError(f"'{kind}' needs a running session: send 'start' first")
        request = SessionRequest(self.session_id, kind, request_id)
        if kind == "prompt":
            request.prompt = self._prompt(message)
            request.mode = message.get("mode")
            if request.mode not in (None, "recache", "none"):
                raise ProtocolError(f"mode must be 'recache' or 'none', got {request.mode!r}")
        elif kind == "control":
            if "data" not in message:
                raise ProtocolError("'control' needs a 'data' field")
            request.data = message["data"]
        self.send_json({"type": "ack", "id": request_id, "command": kind,
                        "chunk": self.chunks_published})  # fmt: skip
        self.state.engine.submit(request)

    def _prompt(self, message: dict[str, Any]) -> str:
        prompt = message.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProtocolError(f"'prompt' must be a non-empty string, got {prompt!r}")
        limit = self.state.limits.max_prompt_chars
        if len(prompt) > limit:
            raise ProtocolError(
                f"prompt too long: {len(prompt)} characters, over the limit max_prompt_chars={limit}"
            )
        return prompt

    def _start(self, message: dict[str, Any], request_id: Any) -> None:
        state, limits = self.state, self.state.limits
        if self.session_id is not None or self.starting:
            raise ProtocolError(
                "this connection already runs a session; send 'stop' first or open another "
                "connection"
            )
        prompt = self._prompt(message)
        height = _integer(message, "height", state.default_size[0], minimum=1)
        width = _integer(message, "width", state.default_size[1], minimum=1)
        if height * width > limits.max_pixels:
            raise ProtocolError(
                f"resolution {height}x{width} is over the limit max_pixels={limits.max_pixels} "
                "(height * width)"
            )
        try:
            latent_height, latent_width = state.latent_size(height, width)
        except ValueError as error:
            raise ProtocolError(str(error).replace("runner.", "")) from None
        num_chunks = _integer(message, "num_chunks", None, minimum=1)
        if num_chunks is not None and num_chunks > limits.max_chunks:
            raise ProtocolError(
                f"num_chunks={num_chunks} is over the limit max_chunks={limits.max_chunks}"
            )
        seed = _integer(message, "seed", None, minimum=0, maximum=2**63 - 1)
        if seed is not None and seed == state.info.get("seed"):
            seed = None  # the server's own seed: the offline run's noise
        save = message.get("save", False)
        if not isinstance(save, bool):
            raise ProtocolError(f"'save' must be true or false, got {save!r}")
        image = None
        if message.get("image") is not None:
            image = decode_image(message["image"], height, width)
        active = sum(1 for c in state.clients if c.session_id is not None or c.starting)
        if active >= limits.max_sessions:
            raise ProtocolError(
                f"too many sessions: {active} open, max_sessions={limits.max_sessions}; "
                "try again when one ends"
            )
        self.starting = True
        spec = OpenSpec(prompt=prompt, height=latent_height, width=latent_width, seed=seed,
                        image=image)  # fmt: skip
        state.engine.submit(
            StartRequest(
                listener=self,
                spec=spec,
                num_chunks=num_chunks if num_chunks is not None else limits.max_chunks,
                save=save,
                request_id=request_id,
                pixel_size=(height, width),
            )
        )


def _integer(message: dict[str, Any], key: str, default: Any, *, minimum: int,
             maximum: int | None = None) -> Any:  # fmt: skip
    value = message.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ProtocolError(f"'{key}' must be {bound}, got {value}")
    return value


def decode_image(encoded: Any, height: int, width: int) -> Any:
    """A base64 PNG / JPEG, decoded in memory -> ``[1, 1, 3, H, W]`` in ``[-1, 1]``."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not isinstance(encoded, str):
        raise ProtocolError("'image' must be a base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB").resize((width, height), Image.BICUBIC)
    except binascii.Error as error:
        raise ProtocolError(f"'image' is not valid base64: {error}") from None
    except Image.DecompressionBombError as error:
        raise ProtocolError(f"'image' is too large to decode safely: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ProtocolError(f"'image' is not a readable PNG or JPEG: {error}") from None
    pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels[None, None]


# ---------------------------------------------------------------------------- the app
def token_problem(state: ServerState, headers: Any, query: Any) -> str | None:
    """Why a request may not pass (``None``: it may); constant-time comparison."""
    if state.token is None:
        return None
    given = query.get("token")
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not given:
        return "missing token: send 'Authorization: Bearer <token>' or '?token=<token>'"
    if not hmac.compare_digest(given.encode(), state.token.encode()):
        return "wrong token"
    return None


def build_app(state: ServerState) -> Any:
    """The Starlette application."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from flashdreams.serve.viewer import VIEWER_HTML

    async def viewer(request):
        return HTMLResponse(VIEWER_HTML)

    async def healthz(request):
        healthy = not state.engine.done.is_set()
        return JSONResponse({"status": "ok" if healthy else "stopped"}, 200 if healthy else 503)

    async def info(request):
        return JSONResponse(state.info)

    async def metrics(request):
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def sessions(websocket: WebSocket):
        await websocket.accept()
        client = Client(websocket, state)
        state.clients.add(client)
        sender = asyncio.create_task(client.send_loop())
        try:
            while True:
                received = await websocket.receive()
                if received["type"] == "websocket.disconnect":
                    break
                if received.get("text") is None:
                    client.send_error("binary messages are not accepted: send JSON text")
                    continue
                try:
                    client.handle_text(received["text"])
                except ProtocolError as error:
                    client.send_error(str(error))
        except WebSocketDisconnect:
            pass
        finally:
            client.disconnected()
            sender.cancel()
            state.clients.discard(client)

    class TokenMiddleware:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] in ("http", "websocket"):
                from starlette.requests import HTTPConnection

                connection = HTTPConnection(scope)
                problem = token_problem(state, connection.headers, connection.query_params)
                if problem is not None:
                    state.metrics.error()
                    response = JSONResponse({"error": problem}, status_code=401)
                    if scope["type"] == "websocket":
                        await WebSocket(scope, receive, send).send_denial_response(response)
                    else:
                        await response(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    routes = [
        Route("/", viewer),
        Route("/healthz", healthz),
        Route("/v1/info", info),
        Route("/metrics", metrics),
        WebSocketRoute("/v1/sessions", sessions),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenMiddleware)])


async def stop_when_engine_done(state: ServerState, flush_timeout_s: float = 10.0) -> None:
    """Once the engine stopped (shutdown or failure): deliver what is queued, then exit."""
    await asyncio.to_thread(state.engine.done.wait)
    await asyncio.gather(*(client.flush(flush_timeout_s) for client in list(state.clients)))
    for client in list(state.clients):
        try:
            await client.websocket.close(code=1001)
        except (RuntimeError, OSError):
            pass
    if state.server is not None:
        state.server.should_exit = True
