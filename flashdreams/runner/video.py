"""MP4 output that stays playable whatever happens: every chunk is final once it is on disk.

:class:`Mp4Writer` streams frames to one ``ffmpeg`` process (H.264) that writes a
*fragmented* MP4 to a pipe: an ``ftyp`` + ``moov`` header, then one ``moof`` + ``mdat``
fragment per frame (``-movflags frag_every_frame+empty_moov``, no B-frames, no
look-ahead, so each frame leaves ffmpeg as soon as the next one arrives). A thread of
this process appends those fragments to ``video.mp4`` itself, so the file is at every
moment a header plus whole frames, and this process knows exactly which frames are on
disk. When a write fails (a full disk), the file is cut back to the end of the last
whole chunk, which leaves a video that plays every chunk written before the failure,
and the next :meth:`Mp4Writer.append` (or :meth:`Mp4Writer.close`) raises
:class:`OutputWriteError` naming the file and the disk.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np

from flashdreams.runner.safety import OutputWriteError, describe_write_error


def _read_box(stream) -> bytes | None:
    """One top-level ISO-BMFF box (header included), ``None`` at the end of the stream."""
    header = stream.read(8)
    if len(header) < 8:
        return None
    size, _kind = struct.unpack(">I4s", header)
    if size == 1:
        large = stream.read(8)
        size = struct.unpack(">Q", large)[0]
        header += large
    body = stream.read(size - len(header))
    return header + body


class Mp4Writer:
    """Streams RGB frames into an H.264 fragmented mp4; opened on the first frames.

    Args:
        path: the mp4 file.
        fps: frame rate.
    """

    def __init__(self, path: str | Path, *, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps
        self.num_frames = 0
        """Frames handed to :meth:`append`."""
        self.frame_size: tuple[int, int] | None = None
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._chunk_ends: list[int] = []  # cumulative frame count at the end of each chunk
        self._frames_on_disk = 0
        self._bytes_at_frame: dict[int, int] = {0: 0}  # chunk-end frame count -> file size
        self._failure: OutputWriteError | None = None
        self._ffmpeg_log = b""

    # ---- main thread ------------------------------------------------------------------

    @property
    def num_chunks_appended(self) -> int:
        """Chunks handed to :meth:`append`."""
        return len(self._chunk_ends)

    @property
    def num_chunks_on_disk(self) -> int:
        """Chunks whose every frame is in the file (the file ends on a chunk boundary after
        :meth:`close`)."""
        with self._lock:
            return sum(1 for end in self._chunk_ends if end <= self._frames_on_disk)

    def append(self, frames: np.ndarray) -> None:
        """Append one chunk of ``[T, H, W, 3]`` uint8 frames."""
        self._raise_if_failed()
        num_frames, height, width, _ = frames.shape
        if self._process is None:
            if height % 2 or width % 2:
                raise ValueError(
                    f"H.264 needs even frame sizes, got {width}x{height}; choose an even "
                    "runner.height / runner.width"
                )
            self.frame_size = (width, height)
            self._start(width, height)
        elif self.frame_size != (width, height):
            raise ValueError(f"frame size changed from {self.frame_size} to {(width, height)}")
        with self._lock:
            self._chunk_ends.append(self.num_frames + num_frames)
        try:
            self._process.stdin.write(np.ascontiguousarray(frames).tobytes())
            self._process.stdin.flush()
        except BrokenPipeError:
            self._finish_process()
            self._raise_if_failed()
            raise OutputWriteError(
                f"the video encoder (ffmpeg) stopped while writing '{self.path}': "
                f"{self._ffmpeg_log.decode(errors='replace').strip() or 'no message'}"
            ) from None
        self.num_frames += num_frames

    def close(self) -> None:
        """Flush the frames still in the encoder and finish the file. Idempotent; raises
        :class:`OutputWriteError` when a write failed (the file then ends on the last whole
        chunk that fitted)."""
        if self._process is not None:
            self._finish_process()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _start(self, width: int, height: int) -> None:
        import imageio_ffmpeg

        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-r", repr(float(self.fps)), "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17",
            "-tune", "zerolatency",  # no B-frames, no look-ahead: frames leave at once
            "-movflags", "frag_every_frame+empty_moov+default_base_moof",
            "-f", "mp4", "pipe:1",
        ]  # fmt: skip
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as error:
            raise OutputWriteError(describe_write_error(self.path, error)) from None
        # Own session: a Ctrl-C in the terminal reaches this process, not the encoder,
        # which is closed in order on the way out.
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._copy_fragments, name="flashdreams-mp4-writer", daemon=True
        )
        self._reader.start()
        self._stderr_reader = threading.Thread(target=self._read_log, daemon=True)
        self._stderr_reader.start()

    def _finish_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except BrokenPipeError:
            pass
        process.wait()
        self._reader.join()
        self._stderr_reader.join()
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError as error:
            self._fail(error)

    # ---- reader thread ----------------------------------------------------------------

    def _read_log(self) -> None:
        self._ffmpeg_log = self._process.stderr.read()[-4000:]

    def _copy_fragments(self) -> None:
        """Append ffmpeg's boxes to the file; one ``moof`` + ``mdat`` pair is one frame."""
        stdout = self._process.stdout
        written = 0
        while True:
            box = _read_box(stdout)
            if box is None:
                return
            kind = box[4:8]
            if self._failure is not None or kind == b"mfra":
                continue  # keep draining so ffmpeg never blocks; the index is not needed
            try:
                view = memoryview(box)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as error:
                self._fail(error)
                continue
            written += len(box)
            with self._lock:
                if kind == b"moov":
                    self._bytes_at_frame[0] = written  # header only: an empty, valid video
                elif kind == b"mdat":
                    self._frames_on_disk += 1
                    if self._frames_on_disk in self._chunk_ends:
                        self._bytes_at_frame[self._frames_on_disk] = written

    def _fail(self, error: OSError) -> None:
        """Cut the file back to the last whole chunk and remember the error."""
        with self._lock:
            if self._failure is not None:
                return
            whole = [end for end in self._chunk_ends if end <= self._frames_on_disk]
            keep_frames = whole[-1] if whole else 0
            self._frames_on_disk = keep_frames
            keep_bytes = self._bytes_at_frame.get(keep_frames, 0)
            self._failure = OutputWriteError(
                f"{describe_write_error(self.path, error)}; the video keeps the "
                f"{len(whole)} chunk(s) written before"
            )
        try:
            os.ftruncate(self._fd, keep_bytes)
        except OSError:
            pass


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4 into ``[T, H, W, 3]`` uint8 frames; returns (frames, fps)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), meta["fps"]
