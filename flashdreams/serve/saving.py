"""``save``: a served session's run directory, laid out like ``flashdreams-run``'s.

    <server output dir>/session-<id>/
        video.mp4            the session's frames (closed so it plays, also on shutdown)
        config.yaml          the server's config with this session's prompt timeline,
                             chunks, size and seed: ``flashdreams-run`` with it redraws
                             the session (seed-less sessions)
        stats.json           status (completed / interrupted), chunks, switches, telemetry
        latents.safetensors  clean latents (``runner.save_latents=true`` on the server)

The directory name comes from the session number only: nothing a client sends
becomes a path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flashdreams.runner.safety import atomic_write_text
from flashdreams.runner.video import Mp4Writer


class SessionSaver:
    """Writes one session's run directory on rank 0 (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        run_config: Any,
        prompt: str,
        pixel_size: tuple[int, int],
        seed: int | None,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=False)
        self.run_dir = run_dir
        self.run_config = run_config
        self.prompt = prompt
        self.pixel_size = pixel_size
        self.seed = seed
        runner = run_config.runner
        self.writer = Mp4Writer(run_dir / "video.mp4", fps=runner.fps)
        self.save_latents = bool(runner.save_latents)
        self.latents: list[Any] = []
        self.switches: list[dict[str, Any]] = []
        self.num_chunks = 0
        self.closed = False

    def append(self, frames: Any, latent: Any) -> None:
        if frames is not None:
            self.writer.append(frames)
        if self.save_latents and latent is not None:
            self.latents.append(latent.detach().float().cpu())
        self.num_chunks += 1

    def record_switch(self, chunk: int, prompt: str, mode: str) -> None:
        self.switches.append({"chunk": chunk, "prompt": prompt, "mode": mode})

    def close(self, status: str, session: Any) -> None:
        """Finish the video, then write latents, config.yaml and stats.json (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        if self.latents:
            import torch
            from safetensors.torch import save_file

            latents = torch.cat(self.latents, dim=-4).contiguous()
            save_file({"latents": latents}, str(self.run_dir / "latents.safetensors"))
        self._write_config()
        stats = {
            "status": status,
            "pipeline": self.run_config.pipeline.name,
            "num_chunks_written": self.num_chunks,
            "prompt_switches": self.switches,
            "noise": "server" if self.seed is None else "session seed",
            "telemetry": None if session is None else session.telemetry.summary(),
        }
        atomic_write_text(self.run_dir / "stats.json", json.dumps(stats, indent=2) + "\n")

    def _write_config(self) -> None:
        from flashdreams.launch.run_config import run_config_to_container, run_config_yaml

        runner = self.run_config.runner
        timeline = None
        if self.switches:
            timeline = [{"chunk": 0, "prompt": self.prompt}] + [
                {"chunk": s["chunk"], "prompt": s["prompt"]} for s in self.switches
            ]
        height, width = self.pixel_size
        session_runner = dataclasses.replace(
            runner,
            prompt=self.prompt,
            prompts_file=None,
            prompt_timeline=timeline,
            prompt_timeline_file=None,
            num_chunks=max(self.num_chunks, 1),
            height=height,
            width=width,
            seed=runner.seed if self.seed is None else self.seed,
            output_dir=str(self.run_dir),
        )
        config = dataclasses.replace(self.run_config, runner=session_runner)
        text = run_config_yaml(run_config_to_container(config))
        atomic_write_text(self.run_dir / "config.yaml", text)
