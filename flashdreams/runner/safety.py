"""Run safety: atomic files, SIGTERM / SIGINT handling, rank-failure notices, fault injection.

Long jobs on shared clusters must not hang, must not write silently wrong
output and must keep the chunks they already produced. The pieces here are
small and independent; the runner and the launcher wire them together:

* :func:`atomic_write_text`: ``config.yaml`` / ``stats.json`` are written to a
  temporary name in the same directory and renamed, so a reader never sees a
  half-written file.
* :class:`StopGuard`: SIGTERM (what SLURM sends on preemption and at the time
  limit) and SIGINT (Ctrl-C) handlers that turn the signal into
  :class:`RunInterrupted`; during the rollout the request is acted on at the next
  safe point (between chunks or denoising steps), never inside a chunk's append.
* the non-finite check (NaN/Inf in a chunk's latent raises
  :class:`~flashdreams.session.NonFiniteOutputError` naming the AR step) runs in
  the session loop (:mod:`flashdreams.session.checks`).
* :class:`RankFailureChannel`: a failing rank posts ``rank r failed at AR step
  k`` to the process group's key-value store; a watchdog thread on every other
  rank reads it and stops that rank (a status broadcast that needs no
  collective, so it also reaches ranks blocked inside one).
* :class:`FaultInjection`: the test-only fault-injection hook, read from one
  environment variable in one place, once per run
  (:func:`fault_injection_from_environment`).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_RUNTIME_ERROR = 1
"""Exit code of a run that failed at run time (a rank failed, non-finite output, ...)."""
EXIT_INTERRUPTED = 128 + signal.SIGTERM
"""Exit code of a run stopped by SIGTERM (the shell convention, 143); SIGINT gives 130."""

FAULT_INJECTION_ENV = "FLASHDREAMS_FAULT_INJECTION"
"""Test-only: ``rank=<r>,step=<k>,stage=<generate|write|finalize>[,kind=<error|nan|sigterm>]``."""

FAULT_STAGES = ("generate", "write", "finalize")
FAULT_KINDS = ("error", "nan", "sigterm")


# ---- atomic files ------------------------------------------------------------------


def _current_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash or a signal at any point leaves either the old file or the new one,
    never a truncated mix.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        os.fchmod(descriptor, 0o666 & ~_current_umask())  # as open() would create it
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---- write failures: a full disk ------------------------------------------------------------


class OutputWriteError(RuntimeError):
    """Writing an output file failed (a full disk, a quota, a vanished directory); the
    message names the file and the disk."""


def describe_write_error(path: str | Path, error: OSError) -> str:
    """``no space left on device writing 'run/video.mp4' (disk: tmpfs mounted on /mnt, 0 B free)``."""
    reason = (error.strerror or str(error)).lower()
    return f"{reason} writing '{path}' ({_disk_of(Path(path))})"


def _disk_of(path: Path) -> str:
    """The filesystem holding ``path``: device, mount point and free space, as far as known."""
    try:
        probe = path.absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        mount = probe.resolve()
        while not os.path.ismount(mount):
            mount = mount.parent
        stat = os.statvfs(probe)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        return "disk unknown"
    device = "?"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[1] == str(mount):
                    device = fields[0]
    except OSError:
        pass
    free_text = f"{free} B" if free < 1024 else f"{free / 1024**2:.1f} MiB"
    return f"disk: {device} mounted on {mount}, {free_text} free"


STATS_RESERVED_BYTES = 128 * 1024
"""Size of the placeholder ``stats.json`` written when a run starts: the final stats fit in
it even when the disk is full by then."""


def reserved_stats_text(pipeline_name: str) -> str:
    """``{"status": "running", ...}`` padded with spaces to :data:`STATS_RESERVED_BYTES`."""
    import json

    text = json.dumps({"status": "running", "pipeline": pipeline_name})
    return text + " " * (STATS_RESERVED_BYTES - len(text) - 1) + "\n"


def write_stats_in_place(path: str | Path, stats: dict[str, Any]) -> bool:
    """Overwrite the reserved ``stats.json`` in place (no new disk space needed).

    Drops the per-chunk details if the whole does not fit. Returns ``False`` when even
    that fails (no reserved file, or a filesystem that needs space to overwrite).
    """
    import json

    compact = {k: v for k, v in stats.items() if k not in ("chunks", "rollouts")}
    compact["details_dropped"] = "the disk was full; per-chunk timings left out"
    try:
        reserved = os.path.getsize(path)
        for candidate in (stats, compact):
            text = json.dumps(candidate, indent=2) + "\n"
            if len(text.encode()) > reserved:
                continue
            with open(path, "r+b") as handle:
                handle.write(text.encode().ljust(reserved - 1) + b"\n")
                handle.flush()
            return True
    except OSError:
        pass
    return False


# ---- stop requests: SIGTERM and failures of other ranks --------------------------------


class RunInterrupted(BaseException):
    """SIGTERM (preemption, time limit) or SIGINT (Ctrl-C) stopped the run. A
    ``BaseException`` so no ``except Exception`` on the way swallows it."""

    def __init__(self, signal_number: int = signal.SIGTERM, where: str = "") -> None:
        self.signal_number = signal_number
        self.where = where
        """Where the rollout stopped, e.g. ``before denoising step 3 of AR step 1``."""
        name = signal.Signals(signal_number).name
        super().__init__(f"interrupted by {name}" + (f" {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signal_number


class PeerRankFailed(RuntimeError):
    """Another rank reported a failure; this rank stops too."""

    def __init__(self, report: FailureReport) -> None:
        self.report = report
        super().__init__(f"stopping because {report.describe()}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that stop a run cleanly."""


class StopGuard:
    """Turns SIGTERM / SIGINT, or a stop request from another thread, into an exception.

    Outside :meth:`deferred` a signal raises :class:`RunInterrupted` in the main thread at
    once. Inside it (the rollout) the first signal is only recorded: the rollout asks
    :attr:`stop_signal` at safe points (between chunks and between denoising steps, where
    every rank agrees on it) and stops there, so no chunk is cut in half and no rank is
    left alone inside a collective. A second signal raises at once.

    Inside :meth:`critical` (appending a chunk to the video) any exception is held back
    until the block ends. Use as a context manager around the run; it restores the
    previous handlers.
    """

    def __init__(self) -> None:
        self.received_signal: int | None = None
        self.received_at: float | None = None
        """``time.monotonic()`` when a deferred stop signal arrived."""
        self._pending: BaseException | None = None
        self._requested: BaseException | None = None
        self._critical_depth = 0
        self._deferred_depth = 0
        self._previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for signal_number in STOP_SIGNALS:
                self._previous_handlers[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signal_number, handler in self._previous_handlers.items():
            signal.signal(signal_number, handler)
        self._previous_handlers = {}

    @property
    def _installed(self) -> bool:
        return bool(self._previous_handlers)

    def _handle(self, signal_number: int, _frame: Any) -> None:
        if self._requested is not None:
            error, self._requested = self._requested, None
        elif self._deferred_depth > 0 and self.received_signal is None:
            self.received_signal = signal_number  # acted on at the next safe point
            self.received_at = time.monotonic()
            return
        else:
            self.received_signal = self.received_signal or signal_number
            error = RunInterrupted(signal_number)
        if self._critical_depth > 0:
            self._pending = self._pending or error
            return
        raise error

    def note_stop(self, signal_number: int) -> None:
        """Record a stop signal another rank received, as if it had arrived here during the
        rollout (acted on at the next safe point)."""
        if self.received_signal is None:
            self.received_signal = signal_number
            self.received_at = time.monotonic()

    def request_stop(self, error: BaseException) -> None:
        """From any thread: raise ``error`` in the main thread.

        Delivers a real SIGTERM to the main thread, which also wakes it from
        interruptible waits (``time.sleep``, most blocking system calls).
        """
        self._requested = error
        if self._installed:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    @property
    def interrupted(self) -> bool:
        """Whether a real SIGTERM / SIGINT arrived."""
        return self.received_signal is not None

    @property
    def stop_signal(self) -> int | None:
        """The signal that asked the run to stop, ``None`` while none did."""
        return self.received_signal

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Record the first stop signal instead of raising (the rollout checks it itself)."""
        self._deferred_depth += 1
        try:
            yield
        finally:
            self._deferred_depth -= 1

    @contextmanager
    def critical(self) -> Iterator[None]:
        """Hold back stop requests until the block ends."""
        self._critical_depth += 1
        try:
            yield
        finally:
            self._critical_depth -= 1
        if self._critical_depth == 0 and self._pending is not None:
            error, self._pending = self._pending, None
            raise error


# ---- rank failure notices ------------------------------------------------------------------


@dataclass(frozen=True)
class FailureReport:
    """What a failing rank tells the others."""

    rank: int
    """Global rank that failed."""
    autoregressive_index: int | None
    """AR step it was in, ``None`` before the rollout started."""
    stage: str
    """``build``, ``generate``, ``write``, ``finalize``, ..."""
    message: str
    """``ExceptionType: message`` of the original error."""

    def describe(self) -> str:
        where = (
            f"at AR step {self.autoregressive_index} ({self.stage})"
            if self.autoregressive_index is not None
            else f"during {self.stage}"
        )
        return f"rank {self.rank} failed {where}: {self.message}"

    def encode(self) -> bytes:
        import json

        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, payload: bytes) -> FailureReport:
        import json

        return cls(**json.loads(payload.decode()))


class RankFailureChannel:
    """Failure notices through a key-value store every rank can reach (the torch.distributed store).

    The first rank to fail writes its :class:`FailureReport`; a watchdog thread
    on every rank polls the store and hands a :class:`PeerRankFailed` to the
    :class:`StopGuard`. If the main thread is stuck inside a collective and
    cannot take the exception, the watchdog ends the process after
    ``grace_s`` (exit code 1). No collective is involved, so a dead or hung
    peer cannot block the notice.
    """

    KEY = "flashdreams/failure/{attempt}"
    COUNT_KEY = "flashdreams/num_failures/{attempt}"

    def __init__(
        self,
        store: Any,
        *,
        rank: int,
        guard: StopGuard,
        poll_interval_s: float = 0.2,
        grace_s: float = 10.0,
    ) -> None:
        self.store = store
        self.rank = rank
        self.guard = guard
        self.poll_interval_s = poll_interval_s
        self.grace_s = grace_s
        self.peer_failure: FailureReport | None = None
        # torchrun --max-restarts reuses its store: keep each attempt's notices apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.key = self.KEY.format(attempt=attempt)
        self.count_key = self.COUNT_KEY.format(attempt=attempt)
        self._posted = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="flashdreams-failure-watchdog", daemon=True
        )

    @classmethod
    def from_environment(cls, *, rank: int, guard: StopGuard, **kwargs: Any) -> RankFailureChannel:
        """A channel on a new client of the rendezvous store (torchrun's or rank 0's).

        The store address is the one the process group was initialised with
        (``flashdreams.core.distributed.parse_launch_environment``).
        """
        from datetime import timedelta

        import torch.distributed as dist

        from flashdreams.core.distributed import parse_launch_environment

        launch = parse_launch_environment()
        store = dist.TCPStore(
            launch.master_addr,
            launch.master_port,
            is_master=False,
            timeout=timedelta(seconds=30),
        )
        return cls(store, rank=rank, guard=guard, **kwargs)

    def start(self) -> RankFailureChannel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def post(self, report: FailureReport) -> None:
        """Tell every rank that this one failed (only the first failure of the job is kept)."""
        if self._posted:
            return
        self._posted = True
        try:
            with self._lock:
                if self.store.add(self.count_key, 1) == 1:
                    self.store.set(self.key, report.encode())
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; exiting anyway
            pass

    def read(self) -> FailureReport | None:
        with self._lock:
            if not self.store.check([self.key]):
                return None
            return FailureReport.decode(self.store.get(self.key))

    def _watch(self) -> None:
        from loguru import logger

        while not self._stop.wait(self.poll_interval_s):
            try:
                report = self.read()
            except Exception:  # noqa: BLE001 - store unreachable: the job is going down
                return
            if report is None or report.rank == self.rank or self._posted:
                continue
            self.peer_failure = report
            logger.error(f"rank {self.rank}: stopping because {report.describe()}")
            self.guard.request_stop(PeerRankFailed(report))
            if self._stop.wait(self.grace_s):
                return
            logger.error(
                f"rank {self.rank}: still blocked {self.grace_s:.0f} s after {report.describe()}; "
                "exiting"
            )
            os._exit(EXIT_RUNTIME_ERROR)


# ---- fault injection (tests only) -------------------------------------------------------


@dataclass(frozen=True)
class FaultInjection:
    """Parsed :data:`FAULT_INJECTION_ENV`."""

    rank: int
    step: int
    stage: str
    kind: str = "error"

    def fire(self, rank: int, autoregressive_index: int, stage: str, latent: Any = None) -> None:
        """Act if this is the injection's rank, AR step and stage.

        ``kind=error`` raises :class:`InjectedFault`; ``kind=sigterm`` sends SIGTERM to
        this process; ``kind=nan`` fills ``latent`` with NaN in place and acts only on
        the call that passes a latent (the others only on calls without one).
        """
        if (self.rank, self.step, self.stage) != (rank, autoregressive_index, stage):
            return
        if (self.kind == "nan") != (latent is not None):
            return
        if self.kind == "nan":
            latent.fill_(float("nan"))
            return
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # let the handler run before the next statement
            return
        raise InjectedFault(
            f"injected fault on rank {rank} at AR step {autoregressive_index} ({stage})"
        )


def parse_fault_injection(text: str | None) -> FaultInjection | None:
    """``rank=1,step=2,stage=generate[,kind=error]`` -> :class:`FaultInjection`; empty -> ``None``."""
    if not text:
        return None
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, separator, value = part.partition("=")
        if not separator:
            raise ValueError(f"{FAULT_INJECTION_ENV}: expected key=value pairs, got {text!r}")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"rank", "step", "stage", "kind"}
    if unknown or not {"rank", "step", "stage"} <= set(fields):
        raise ValueError(
            f"{FAULT_INJECTION_ENV}: use rank=<r>,step=<k>,stage=<{'|'.join(FAULT_STAGES)}>"
            f"[,kind=<{'|'.join(FAULT_KINDS)}>], got {text!r}"
        )
    injection = FaultInjection(
        rank=int(fields["rank"]),
        step=int(fields["step"]),
        stage=fields["stage"],
        kind=fields.get("kind", "error"),
    )
    if injection.stage not in FAULT_STAGES or injection.kind not in FAULT_KINDS:
        raise ValueError(
            f"{FAULT_INJECTION_ENV}: stage must be one of {', '.join(FAULT_STAGES)} and kind "
            f"one of {', '.join(FAULT_KINDS)}, got {text!r}"
        )
    return injection


class InjectedFault(RuntimeError):
    """Raised by :meth:`FaultInjection.fire`."""


def fault_injection_from_environment() -> FaultInjection | None:
    """The one place that reads :data:`FAULT_INJECTION_ENV` (set by tests, never by users);
    the runner reads it once per run."""
    return parse_fault_injection(os.environ.get(FAULT_INJECTION_ENV))
