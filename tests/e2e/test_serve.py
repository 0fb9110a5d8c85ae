"""flashdreams-serve end to end: a real server process on a free loopback port, driven by a
Python WebSocket client (wan-tiny-t2v on CPU).

One server serves the session tests (switch + save == offline run, eight concurrent sessions
beside the bad-input matrix, disconnect, slow reader); a second one, bound off loopback with
a token, checks the token and the graceful SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import run_cli
from safetensors.torch import load_file
from serve_helpers import connect, decode_jpeg, run_session, start_server

from flashdreams.runner.video import read_mp4

pytest.importorskip("websockets")
pytest.importorskip("starlette")

SIZE = 64  # runner.height / width of wan-tiny-t2v (tiny runner)
LIMITS = ["--max-sessions", "8", "--max-pixels", "16384", "--max-message-bytes", "65536",
          "--disconnect-grace-s", "0.2", "--max-queued-frames", "24",
          "--send-buffer-bytes", "8192", "--jpeg-quality", "95"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    args = ["wan-tiny-t2v", "runner.save_latents=true", f"runner.output_dir={root / 'served'}"]
    process = start_server([*args, *LIMITS], root)
    process.root = root
    yield process
    assert process.stop() == 0, "".join(process.log)


def switch_after_first_chunk(ws, message, record):
    """After chunk 0: pause, switch the prompt while paused, resume (the switch then applies
    where the pause did, however fast the chunks are)."""
    if message["type"] == "chunk" and message["index"] == 0:
        ws.send(json.dumps({"type": "pause", "id": "pause"}))
    if message["type"] == "applied" and message["id"] == "pause":
        ws.send(json.dumps({"type": "prompt", "prompt": "a blue cube", "id": "switch-1"}))
        ws.send(json.dumps({"type": "resume", "id": "resume"}))


def test_session_switch_frames_and_saved_run_equal_the_offline_run(server):
    num_chunks = 4
    record = run_session(
        server,
        {"prompt": "a red ball", "num_chunks": num_chunks, "save": True, "id": "s"},
        on_message=switch_after_first_chunk,
    )
    started = record.of_type("started")[0]
    assert (started["height"], started["width"], started["fps"], started["id"]) == (
        SIZE, SIZE, 16.0, "s",
    )  # fmt: skip
    ack = record.index_of("ack", id="switch-1")
    applied = record.index_of("applied", id="switch-1")
    assert ack < applied
    switch_chunk = record.messages[applied]["chunk"]
    assert record.messages[ack]["chunk"] <= switch_chunk < num_chunks
    paused_at = record.messages[record.index_of("applied", id="pause")]["chunk"]
    assert 1 <= paused_at == switch_chunk
    chunks = record.of_type("chunk")
    assert [c["index"] for c in chunks] == list(range(num_chunks))
    assert len(record.frames) == sum(c["num_frames"] for c in chunks) > num_chunks
    for index, jpeg in record.frames:
        assert decode_jpeg(jpeg).shape == (SIZE, SIZE, 3), f"chunk {index}"
    assert record.messages[-1] == {"type": "ended", "session": started["session"],
                                   "reason": "completed"}  # fmt: skip
    # The saved run directory equals flashdreams-run with the same prompt timeline and seed.
    saved = server.root / "served" / f"session-{started['session']:04d}"
    assert started["save_dir"] == str(saved)
    timeline = server.root / "timeline.jsonl"
    timeline.write_text(
        json.dumps({"chunk": 0, "prompt": "a red ball"}) + "\n"
        + json.dumps({"chunk": switch_chunk, "prompt": "a blue cube"}) + "\n"
    )  # fmt: skip
    offline = run_cli(
        ["wan-tiny-t2v", f"runner.num_chunks={num_chunks}", "runner.save_latents=true",
         f"runner.prompt_timeline_file={timeline}", "runner.output_dir=offline"],
        server.root,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    served_latents = load_file(str(saved / "latents.safetensors"))["latents"]
    offline_latents = load_file(str(server.root / "offline" / "latents.safetensors"))["latents"]
    assert served_latents.shape == offline_latents.shape
    assert (served_latents - offline_latents).abs().max().item() <= 1e-6
    served_frames, _ = read_mp4(saved / "video.mp4")
    offline_frames, _ = read_mp4(server.root / "offline" / "video.mp4")
    assert served_frames.shape == offline_frames.shape
    assert (served_frames == offline_frames).all()
    stats = json.loads((saved / "stats.json").read_text())
    assert stats["status"] == "completed" and stats["num_chunks_written"] == num_chunks
    assert stats["prompt_switches"] == [
        {"chunk": switch_chunk, "prompt": "a blue cube", "mode": "recache"}
    ]


def request_errors(server, messages: list[str]) -> list[str]:
    """Send each raw message on one connection; the ``error`` message each one got."""
    errors = []
    with connect(server) as ws:
        for text in messages:
            ws.send(text)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error", reply
            errors.append(reply["message"])
    return errors


def test_eight_concurrent_sessions_complete_beside_refused_bad_input(server):
    num_chunks = 2
    records: list = [None] * 8
    started = [threading.Event() for _ in records]

    def run(index: int) -> None:
        def note(ws, message, record):
            if message["type"] == "started":
                started[index].set()

        records[index] = run_session(
            server, {"prompt": f"scene {index}", "seed": index, "num_chunks": num_chunks},
            on_message=note,
        )  # fmt: skip
        started[index].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(records))]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(120)
    start = {"type": "start", "prompt": "one more"}
    errors = request_errors(
        server,
        [
            json.dumps(start),
            "{not json",
            json.dumps({"type": "dance"}),
            json.dumps({**start, "prompt": "x" * 70_000}),
            json.dumps({**start, "prompt": "y" * 10_000}),
            json.dumps({**start, "height": 256, "width": 256}),
            json.dumps({**start, "height": 60}),
            json.dumps({"type": "prompt", "prompt": "no session"}),
            json.dumps({**start, "num_chunks": "three"}),
            json.dumps({**start, "image": "not base64!"}),
            json.dumps({**start, "image": "aGVsbG8="}),  # base64 of b"hello"
        ],
    )
    assert errors[0] == ("too many sessions: 8 open, max_sessions=8; try again when one ends")
    assert errors[1].startswith("malformed JSON: ")
    assert errors[2] == (
        "unknown message type 'dance'; expected one of start, prompt, control, pause, resume, stop"
    )
    assert errors[3].startswith("message too large: ")
    assert errors[3].endswith("bytes, over the limit max_message_bytes=65536")
    assert errors[4] == ("prompt too long: 10000 characters, over the limit max_prompt_chars=2000")
    assert errors[5] == ("resolution 256x256 is over the limit max_pixels=16384 (height * width)")
    assert errors[6].startswith("height=60 is not a multiple of 16 (try 48 or 64)")
    assert errors[7] == "'prompt' needs a running session: send 'start' first"
    assert errors[8] == "'num_chunks' must be an integer, got 'three'"
    assert errors[9].startswith("'image' is not valid base64: ")
    assert errors[10].startswith("'image' is not a readable PNG or JPEG: cannot identify image")
    for thread in threads:
        thread.join(120)
    for index, record in enumerate(records):
        assert not record.of_type("error"), record.of_type("error")
        chunks = record.of_type("chunk")
        assert [c["index"] for c in chunks] == list(range(num_chunks)), index
        assert len(record.frames) == sum(c["num_frames"] for c in chunks)
        assert record.messages[-1]["reason"] == "completed"
    assert len({r.of_type("started")[0]["session"] for r in records}) == 8


def test_a_failing_session_ends_alone_and_pause_resume_stop(server):
    """A control on a pipeline without an encoder fails that session's next chunk: it gets an
    ``error`` and ``ended(error)``; a concurrent session pauses, resumes and stops untouched."""

    def fail_after_first_chunk(ws, message, record):
        if message["type"] == "chunk" and message["index"] == 0:
            ws.send(json.dumps({"type": "control", "data": [1, 2], "id": "c"}))

    failing = {}
    thread = threading.Thread(
        target=lambda: failing.update(
            record=run_session(server, {"prompt": "fails"}, on_message=fail_after_first_chunk)
        )
    )
    thread.start()
    steps = iter(["pause", "resume", "stop"])

    def steer(ws, message, record):
        if message["type"] == "chunk" and message["index"] == 0 or message["type"] == "applied":
            command = next(steps, None)
            if command:
                ws.send(json.dumps({"type": command, "id": command}))

    healthy = run_session(server, {"prompt": "healthy"}, on_message=steer)
    thread.join(120)
    record = failing["record"]
    (error,) = record.of_type("error")
    assert re.match(
        r"session \d+ failed at chunk \d+: ValueError: input was given but the pipeline has no "
        "encoder",
        error["message"],
    ), error["message"]
    assert record.messages[-1]["reason"] == "error"
    applied = {m["command"]: m["chunk"] for m in healthy.of_type("applied")}
    assert applied["pause"] <= applied["resume"] <= applied["stop"]
    assert not healthy.of_type("error") and healthy.messages[-1]["reason"] == "stopped"
    chunks = [c["index"] for c in healthy.of_type("chunk")]
    assert chunks == list(range(len(chunks))) and len(chunks) == applied["stop"]


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_frees_the_session(server):
    assert wait_for(lambda: server.metric("flashdreams_serve_active_sessions") == 0)
    with connect(server) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "a red ball"}))  # until stopped
        while not (isinstance(m := ws.recv(timeout=60), str) and json.loads(m)["type"] == "chunk"):
            pass
        assert server.metric("flashdreams_serve_active_sessions") == 1
        cache_bytes = server.metric("flashdreams_serve_cache_bytes")
        assert cache_bytes > 0
    assert wait_for(lambda: server.metric("flashdreams_serve_active_sessions") == 0)
    assert server.metric("flashdreams_serve_cache_bytes") == 0
    _, metrics = server.get("/metrics")
    assert 'flashdreams_serve_sessions_ended_total{reason="disconnected"} 1' in metrics
    # Histograms in the Prometheus text format: every chunk observed once.
    chunks = server.metric("flashdreams_serve_chunks_total")
    assert server.metric("flashdreams_serve_chunk_latency_seconds_count") == chunks > 0
    assert f'flashdreams_serve_chunk_latency_seconds_bucket{{le="+Inf"}} {int(chunks)}' in metrics
    assert "# TYPE flashdreams_serve_time_to_first_frame_seconds histogram" in metrics


def test_slow_reader_sees_dropped_frames_and_others_keep_theirs(server):
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((host, int(port)))
    with connect(server, sock=sock, max_queue=1) as slow:
        slow.send(json.dumps({"type": "start", "prompt": "slow", "num_chunks": 20}))
        fast = {}
        fast_thread = threading.Thread(
            target=lambda: fast.update(
                record=run_session(server, {"prompt": "fast", "num_chunks": 12})
            )
        )
        fast_thread.start()
        fast_thread.join(180)  # the slow client reads nothing meanwhile
        messages, num_frames = [], 0
        while not messages or messages[-1]["type"] != "ended":
            received = slow.recv(timeout=60)
            if isinstance(received, bytes):
                num_frames += 1
            else:
                messages.append(json.loads(received))
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert chunks[-1]["index"] == 19
    assert len(chunks) < 20 and chunks[-1]["dropped_frames"] > 0
    assert num_frames == sum(c["num_frames"] for c in chunks)
    assert server.metric("flashdreams_serve_frames_dropped_total") >= chunks[-1]["dropped_frames"]
    fast_chunks = fast["record"].of_type("chunk")
    assert [c["index"] for c in fast_chunks] == list(range(12))
    assert all(c["dropped_frames"] == 0 for c in fast_chunks)


def test_token_off_loopback_and_graceful_sigterm(tmp_path):
    import subprocess

    from serve_helpers import serve_command

    refused = subprocess.run(
        [*serve_command(), "wan-tiny-t2v", "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--host 0.0.0.0 is reachable from other machines: give an access token" in (
        refused.stderr
    )
    token = "s3cret-token"
    server = start_server(
        ["wan-tiny-t2v", "runner.save_latents=true", f"runner.output_dir={tmp_path / 'out'}",
         "--host", "0.0.0.0", "--token", token],
        tmp_path, token=token,
    )  # fmt: skip
    try:
        status, body = server.get("/healthz", token=None)
        assert status == 401 and "missing token" in body
        status, body = server.get("/v1/info", token="wrong-token")
        assert status == 401 and "wrong token" in body
        assert server.get("/healthz")[0] == 200
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect as ws_connect

        for url in (server.ws_url.split("?")[0], server.ws_url.replace(token, "wrong-token")):
            with pytest.raises(InvalidStatus) as refused_ws:
                ws_connect(url, open_timeout=30)
            assert refused_ws.value.response.status_code == 401

        # SIGTERM mid-session: ended(shutdown), the saved mp4 plays, exit 0.
        def stop_after_two_chunks(ws, message, record):
            if message["type"] == "chunk" and message["index"] == 1:
                server.process.send_signal(signal.SIGTERM)

        record = run_session(server, {"prompt": "a red ball", "save": True},
                             on_message=stop_after_two_chunks)  # fmt: skip
        assert record.messages[-1]["type"] == "ended"
        assert record.messages[-1]["reason"] == "shutdown"
        assert server.process.wait(60) == 0, "".join(server.log)
    finally:
        server.stop()
    chunks = record.of_type("chunk")
    saved = tmp_path / "out" / "session-0000"
    frames, _ = read_mp4(saved / "video.mp4")
    assert len(frames) == sum(c["num_frames"] for c in chunks) == len(record.frames)
    stats = json.loads((saved / "stats.json").read_text())
    assert stats["status"] == "interrupted" and stats["num_chunks_written"] == len(chunks)


def child_with_rank(parent_pid: int, rank: int) -> int:
    """The pid of the child of ``parent_pid`` (a torchrun agent) started with ``RANK=rank``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {parent_pid} with RANK={rank}")


def saved_latents(record, cwd: Path) -> Any:
    save_dir = cwd / record.of_type("started")[0]["save_dir"]  # relative: under the cwd
    return load_file(str(save_dir / "latents.safetensors"))["latents"]


def test_torchrun_two_ranks_serve_the_one_rank_latents(server, tmp_path):
    """Rank 0 serves, both ranks step the sessions (gloo CP). A session equals the same session
    on the 1-rank server; one with a prompt switch equals the 1-rank offline run with the same
    timeline (which the 1-rank server equals, see above); a killed rank ends the sessions with
    an error and the server exits non-zero."""
    plain = {"prompt": "a green tree", "num_chunks": 3, "save": True, "height": 32, "width": 48}
    one_rank_record = run_session(server, plain)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    size = ["runner.height=32", "runner.width=48"]  # 4 x 6 latent: 6 tokens per frame
    one_rank = server
    server = start_server(
        ["wan-tiny-t2v", *size, "runner.save_latents=true", "runner.output_dir=served",
         "parallel.backend=gloo"],
        tmp_path, prefix=torchrun,
    )  # fmt: skip
    try:
        _, info = server.get("/v1/info")
        assert json.loads(info)["world_size"] == 2
        two_rank_record = run_session(server, plain)
        one = saved_latents(one_rank_record, one_rank.root)
        two = saved_latents(two_rank_record, tmp_path)
        assert one.shape == two.shape and (one - two).abs().max().item() <= 1e-5
        assert one_rank.process.poll() is None
        num_chunks = 4
        record = run_session(
            server,
            {"prompt": "a red ball", "num_chunks": num_chunks, "save": True},
            on_message=switch_after_first_chunk,
        )

        # A rank failure ends the sessions with an error to their clients; exit non-zero.
        def kill_rank_1(ws, message, record):
            if message["type"] == "chunk" and message["index"] == 1:
                os.kill(child_with_rank(server.process.pid, 1), signal.SIGKILL)

        failed = run_session(server, {"prompt": "a red ball"}, on_message=kill_rank_1)
        assert failed.messages[-1] == {"type": "ended", "session": 2, "reason": "error"}
        (error,) = failed.of_type("error")
        pattern = r"(session 2 failed at chunk \d+|the server stopped): RuntimeError: "
        assert re.match(pattern, error["message"]), error
        assert server.process.wait(60) != 0
        assert "flashdreams-serve stopped (exit code 1)" in "".join(server.log)
    finally:
        server.stop()
    switch_chunk = record.messages[record.index_of("applied", id="switch-1")]["chunk"]
    assert [c["index"] for c in record.of_type("chunk")] == list(range(num_chunks))
    timeline = tmp_path / "timeline.jsonl"
    timeline.write_text(
        json.dumps({"chunk": 0, "prompt": "a red ball"}) + "\n"
        + json.dumps({"chunk": switch_chunk, "prompt": "a blue cube"}) + "\n"
    )  # fmt: skip
    one_rank = run_cli(
        ["wan-tiny-t2v", *size, f"runner.num_chunks={num_chunks}", "runner.save_latents=true",
         f"runner.prompt_timeline_file={timeline}", "runner.output_dir=offline"],
        tmp_path,
    )  # fmt: skip
    assert one_rank.returncode == 0, one_rank.stderr
    served = load_file(str(tmp_path / "served" / "session-0001" / "latents.safetensors"))
    offline = load_file(str(tmp_path / "offline" / "latents.safetensors"))
    assert served["latents"].shape == offline["latents"].shape
    # fp32; only the attention reduction order differs between 1 and 2 ranks.
    assert (served["latents"] - offline["latents"]).abs().max().item() <= 1e-5


def test_i2v_image_sent_as_base64_equals_the_offline_run_from_the_file(tmp_path):
    """The first frame travels as base64 and is decoded in memory; the saved session equals
    ``flashdreams-run wan-tiny-i2v runner.image=<the same file>``."""
    import base64

    import numpy as np
    from PIL import Image

    image_path = tmp_path / "first.png"
    pixels = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    server = start_server(
        ["wan-tiny-i2v", "runner.save_latents=true", "runner.output_dir=served"], tmp_path
    )
    try:
        encoded = base64.b64encode(image_path.read_bytes()).decode()
        record = run_session(
            server, {"prompt": "a red ball", "num_chunks": 2, "save": True, "image": encoded}
        )
    finally:
        assert server.stop() == 0, "".join(server.log)
    assert record.messages[-1]["reason"] == "completed", record.messages
    offline = run_cli(
        ["wan-tiny-i2v", "runner.num_chunks=2", "runner.prompt=a red ball",
         f"runner.image={image_path}", "runner.save_latents=true", "runner.output_dir=offline"],
        tmp_path,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    served = saved_latents(record, tmp_path)
    expected = load_file(str(tmp_path / "offline" / "latents.safetensors"))["latents"]
    assert served.shape == expected.shape
    assert (served - expected).abs().max().item() <= 1e-6
