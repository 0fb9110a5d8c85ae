"""The run directory: chosen, locked and (on an early failure) cleaned up by rank 0.

Rules, in order:

* ``runner.output_dir`` unset: a fresh ``outputs/<slug>/<time>[_job<n>]`` is created.
* Set: it is created when missing; an empty value or a path that is a file is refused.
* The directory is locked (``fcntl.flock`` on ``.flashdreams.lock``, released by the kernel
  when the process dies) before anything else is looked at; a second run into a directory
  that is being written is refused.
* A directory that already holds a run's files (``config.yaml``, ``stats.json``, a video,
  latents or logs) is refused, unless ``runner.overwrite=true``, which deletes those files
  first (and only those).
* When the run fails before its first chunk, rank 0 removes the run files it created and
  the directories it created if they are empty; files that were there before are never
  touched.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from flashdreams.runner.safety import OutputWriteError, describe_write_error

LOCK_NAME = ".flashdreams.lock"
"""Lock file held by the run that writes the directory."""

RUN_FILE_PATTERNS = (
    "config.yaml",
    "stats.json",
    "video.mp4",
    "video_*.mp4",
    "latents.safetensors",
    "log_rank*.txt",
)
"""Files a run writes; their presence marks a directory as holding a run."""

TEMPORARY_PATTERNS = (".*.tmp",)
"""Temporary names of files being written (``atomic_write_text``)."""


def run_files(path: Path, patterns: tuple[str, ...] = RUN_FILE_PATTERNS) -> list[str]:
    """Names of the run files in ``path``, sorted."""
    return sorted({p.name for pattern in patterns for p in path.glob(pattern) if p.is_file()})


@dataclass
class RunDirectory:
    """A run directory this process holds the lock of."""

    path: Path
    """The directory."""
    created_dirs: list[Path] = field(default_factory=list)
    """Directories this run created, deepest first (removed on an early failure if empty)."""
    preexisting: frozenset[str] = frozenset()
    """Names in the directory when the run took it (never removed by the clean-up)."""
    lock_fd: int | None = None
    """Open, locked ``.flashdreams.lock``."""
    removed_previous: tuple[str, ...] = ()
    """Files of an earlier run deleted because of ``runner.overwrite=true``."""

    def remove_unfinished(self) -> None:
        """Nothing was produced: remove what this run created, nothing else."""
        for name in run_files(self.path, RUN_FILE_PATTERNS + TEMPORARY_PATTERNS):
            if name not in self.preexisting:
                (self.path / name).unlink(missing_ok=True)
        self.release()
        self.remove_empty_created_dirs()

    def remove_empty_created_dirs(self) -> None:
        for directory in self.created_dirs:
            try:
                directory.rmdir()  # only when empty
            except OSError:
                break

    def release(self) -> None:
        """Unlock and delete the lock file. Idempotent."""
        if self.lock_fd is None:
            return
        fd, self.lock_fd = self.lock_fd, None
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)  # closing drops the flock


def _auto_named(slug: str, job_number: int | None) -> tuple[Path, list[Path]]:
    """A fresh ``outputs/<slug>/<time>[_job<n>][-k]``; returns it and the directories created."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name = stamp if job_number is None else f"{stamp}_job{job_number}"
    base = Path("outputs") / slug / name
    created = [p for p in (base.parent, base.parent.parent) if not p.exists()]
    candidate, suffix = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate, [candidate, *created]
        except FileExistsError:
            candidate = base.with_name(f"{name}-{suffix}")
            suffix += 1


def _create(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories that did not exist, deepest first."""
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"runner.output_dir: '{path}' exists and is not a directory; choose a directory"
        )
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(
            f"runner.output_dir: a part of '{path}' is a file, not a directory"
        ) from None
    except NotADirectoryError:
        raise ValueError(
            f"runner.output_dir: a part of '{path}' is a file, not a directory"
        ) from None
    return missing


def _lock(path: Path) -> int:
    """Open and flock ``path/.flashdreams.lock``; ``ValueError`` when another run holds it."""
    lock_path = path / LOCK_NAME
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"runner.output_dir '{path}' is in use by another run (pid {holder}); "
                "wait for it to finish or choose another directory"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # not unlinked by a run that finished meanwhile
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the refusal message only
            except OSError:
                pass  # a full disk: the lock holds without the pid
            return fd
        os.close(fd)


def claim_run_dir(
    output_dir: str | None, slug: str, job_number: int | None, *, overwrite: bool = False
) -> RunDirectory:
    """Choose, create and lock the run directory (rank 0 only); see the module docstring."""
    if output_dir is None:
        path, created = _auto_named(slug, job_number)
    else:
        if not output_dir.strip():
            raise ValueError(
                "runner.output_dir is empty; give a directory, or leave it unset for "
                "outputs/<slug>/<time>/"
            )
        path = Path(output_dir)
        if job_number is not None:
            path = path / f"job{job_number}"
        created = _create(path)
    run_dir = RunDirectory(path=path, created_dirs=created)
    try:
        try:
            run_dir.lock_fd = _lock(path)
        except OSError as error:
            raise OutputWriteError(describe_write_error(path / LOCK_NAME, error)) from None
        run_dir.preexisting = frozenset(os.listdir(path))
        previous = run_files(path)
        if previous and not overwrite:
            raise ValueError(
                f"runner.output_dir '{path}' already holds a run ({', '.join(previous)}); "
                "choose a new directory, or set runner.overwrite=true to replace those files"
            )
        for name in previous:
            (path / name).unlink()
        run_dir.removed_previous = tuple(previous)
        run_dir.preexisting = frozenset(os.listdir(path))
    except BaseException:
        run_dir.release()  # refused: touch no file, remove only empty directories it made
        run_dir.remove_empty_created_dirs()
        raise
    return run_dir
