"""``parallel.decode=dedicated``: a rank waiting for its peer's next message stops as soon as
the failure channel reports a failed rank, even when that peer neither sends nor exits."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist

from flashdreams.runner.decode_plans import DecodeLink, decode_on_dedicated_rank
from flashdreams.runner.safety import (
    FailureReport,
    PeerRankFailed,
    RankFailureChannel,
    StopGuard,
)
from flashdreams.testing import run_on_ranks

SILENT_S = 8.0
"""How long the failed rank stays alive without sending anything."""
STOP_BOUND_S = 6.0
"""Generous bound on the decode rank's stop (measured: ~0.2 s; the channel polls every 0.2 s)."""


class _NoDecoder:
    """The decode rank's decoder; this test never gets as far as a chunk."""

    def initialize_autoregressive_cache(self) -> None:
        return None


def _failed_peer_stays_silent(rank: int, world_size: int) -> None:
    store = dist.TCPStore(
        "127.0.0.1", int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=30)
    )
    link = DecodeLink(1 - rank, "cpu")
    if rank == 0:  # the output rank failed; it is still cleaning up (or its NCCL peer is gone)
        channel = RankFailureChannel(store, rank=0, guard=StopGuard())
        channel.post(FailureReport(0, 1, "generate", "InjectedFault: injected"))
        time.sleep(SILENT_S)
        link.send(DecodeLink.END)  # completes the receive the decode rank abandoned
        return
    with StopGuard() as guard, guard.deferred():  # as the runner's decode rank waits
        channel = RankFailureChannel(store, rank=1, guard=guard).start()
        started = time.monotonic()
        try:
            decode_on_dedicated_rank(_NoDecoder(), link, stop_signal=lambda: guard.stop_signal)
        except PeerRankFailed as error:
            assert "rank 0 failed at AR step 1 (generate)" in str(error), error
        else:
            raise AssertionError("the decode rank did not stop on the failure notice")
        finally:
            channel.stop()
        elapsed = time.monotonic() - started
    assert elapsed < STOP_BOUND_S, f"the decode rank stopped {elapsed:.2f} s after the notice"


def test_decode_rank_stops_promptly_when_its_peer_failed_silently():
    run_on_ranks(_failed_peer_stays_silent, 2)
