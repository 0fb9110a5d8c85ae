"""The browser viewer served at ``GET /``: plays a session's frames on a canvas at the
stream's fps, with a prompt box, a switch button and live stats. A ``?token=`` in the
page URL is passed on to the WebSocket."""

VIEWER_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>flashdreams-serve</title>
<style>
  body { font-family: sans-serif; margin: 1.5em; background: #111; color: #eee; }
  canvas { background: #000; image-rendering: pixelated; width: 512px; border: 1px solid #444; }
  input[type=text] { width: 30em; }
  #stats { font-family: monospace; white-space: pre; margin-top: 0.5em; }
  #log { font-family: monospace; color: #f88; }
</style>
</head>
<body>
<h3>flashdreams-serve</h3>
<div>
  <input id="prompt" type="text" value="A red panda rolls down a grassy hill at sunset.">
  <button id="start">Start</button>
  <button id="switch" disabled>Switch prompt</button>
  <button id="stop" disabled>Stop</button>
</div>
<p><canvas id="canvas" width="64" height="64"></canvas></p>
<div id="stats">not started</div>
<div id="log"></div>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const url = scheme + "//" + location.host + "/v1/sessions" +
  (token ? "?token=" + encodeURIComponent(token) : "");
const canvas = document.getElementById("canvas");
const context = canvas.getContext("2d");
const statsBox = document.getElementById("stats");
const logBox = document.getElementById("log");
const MAX_QUEUED_SECONDS = 2;  // a live view: older frames are dropped, not played late
const stats = { session: null, chunks: 0, frames: 0, shown: 0, dropped: 0, skipped: 0, fps: 16,
                lastChunk: null, startedAt: 0, firstFrameS: null, prompt: "", state: "idle" };
let socket = null, frameQueue = [], player = null, pendingFrames = 0, requestId = 0;

function showStats() {
  const timings = stats.lastChunk ? stats.lastChunk.timings : null;
  statsBox.textContent =
    "state " + stats.state + "  session " + stats.session + "  prompt: " + stats.prompt + "\\n" +
    "chunks " + stats.chunks + "  frames received " + stats.frames + "  shown " + stats.shown +
    "  dropped by server " + stats.dropped + "  skipped by viewer " + stats.skipped +
    "  queued " + frameQueue.length + "\\n" +
    "stream fps " + stats.fps + "  first frame " +
    (stats.firstFrameS === null ? "-" : stats.firstFrameS.toFixed(2) + " s") +
    (timings ? "  last chunk " + timings.total_s.toFixed(3) + " s (denoise " +
      timings.denoise_s.toFixed(3) + " s, decode " + timings.decode_s.toFixed(3) + " s)" : "");
}

function play() {
  if (player) clearInterval(player);
  player = setInterval(() => {
    const frame = frameQueue.shift();
    if (!frame) return;
    if (canvas.width !== frame.width || canvas.height !== frame.height) {
      canvas.width = frame.width; canvas.height = frame.height;
    }
    context.drawImage(frame, 0, 0);
    frame.close();
    stats.shown += 1;
    showStats();
  }, 1000 / stats.fps);
}

function send(message) {
  message.id = ++requestId;
  socket.send(JSON.stringify(message));
}

document.getElementById("start").onclick = () => {
  if (socket) socket.close();
  socket = new WebSocket(url);
  socket.binaryType = "blob";
  stats.startedAt = performance.now();
  stats.prompt = document.getElementById("prompt").value;
  stats.state = "starting";
  showStats();
  socket.onopen = () => send({ type: "start", prompt: stats.prompt });
  socket.onmessage = async (event) => {
    if (typeof event.data !== "string") {
      const bitmap = await createImageBitmap(event.data);
      frameQueue.push(bitmap);
      stats.frames += 1;
      while (frameQueue.length > MAX_QUEUED_SECONDS * stats.fps) {
        frameQueue.shift().close();
        stats.skipped += 1;
      }
      if (stats.firstFrameS === null) stats.firstFrameS = (performance.now() - stats.startedAt) / 1000;
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "started") {
      stats.session = message.session; stats.fps = message.fps; stats.state = "running";
      canvas.width = message.width; canvas.height = message.height;
      document.getElementById("switch").disabled = false;
      document.getElementById("stop").disabled = false;
      play();
    } else if (message.type === "chunk") {
      stats.chunks += 1; stats.lastChunk = message; stats.dropped = message.dropped_frames;
    } else if (message.type === "applied" && message.command === "prompt") {
      stats.state = "running (switched at chunk " + message.chunk + ")";
    } else if (message.type === "ended") {
      stats.state = "ended: " + message.reason;
      document.getElementById("switch").disabled = true;
      document.getElementById("stop").disabled = true;
    } else if (message.type === "error") {
      logBox.textContent = "error: " + message.message;
    }
    showStats();
  };
  socket.onclose = () => { if (stats.state.startsWith("running")) stats.state = "disconnected"; showStats(); };
};

document.getElementById("switch").onclick = () => {
  stats.prompt = document.getElementById("prompt").value;
  send({ type: "prompt", prompt: stats.prompt });
};
document.getElementById("stop").onclick = () => send({ type: "stop" });
</script>
</body>
</html>
"""
