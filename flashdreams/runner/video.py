"""MP4 output through imageio-ffmpeg: frames are appended as soon as they exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Mp4Writer:
    """Streams RGB frames into an H.264 mp4; the file is opened on the first frames."""

    def __init__(self, path: str | Path, *, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps
        self.num_frames = 0
        self.frame_size: tuple[int, int] | None = None
        self._writer = None

    def append(self, frames: np.ndarray) -> None:
        """Append ``[T, H, W, 3]`` uint8 frames."""
        import imageio_ffmpeg

        num_frames, height, width, _ = frames.shape
        if self._writer is None:
            if height % 2 or width % 2:
                raise ValueError(
                    f"H.264 needs even frame sizes, got {width}x{height}; choose an even "
                    "runner.height / runner.width"
                )
            self.frame_size = (width, height)
            self._writer = imageio_ffmpeg.write_frames(
                str(self.path),
                (width, height),
                fps=self.fps,
                codec="libx264",
                pix_fmt_out="yuv420p",
                macro_block_size=1,
                quality=8,
                ffmpeg_log_level="error",
            )
            self._writer.send(None)
        elif self.frame_size != (width, height):
            raise ValueError(f"frame size changed from {self.frame_size} to {(width, height)}")
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.num_frames += num_frames

    def close(self) -> None:
        """Finish the file so it plays; safe to call twice and after ffmpeg already exited
        (e.g. it got the same SIGTERM as the job)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except BrokenPipeError:
                pass


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4 into ``[T, H, W, 3]`` uint8 frames; returns (frames, fps)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), meta["fps"]
