"""Refusals of ``parallel.decode`` before any work (``check_decode_plan``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flashdreams.runner.preflight import check_decode_plan


def _runner(**overrides):
    return SimpleNamespace(**{"overlap_decode": False, "quality_check": False, **overrides})


def _parallel(decode="dedicated", cfg_parallel=False):
    return SimpleNamespace(decode=decode, cfg_parallel=cfg_parallel)


def test_dedicated_with_cfg_parallel_needs_an_odd_world_size():
    with pytest.raises(ValueError) as error:
        check_decode_plan(_parallel(cfg_parallel=True), _runner(), 4)
    assert str(error.value) == (
        "parallel.decode=dedicated with parallel.cfg_parallel=true needs an odd world size: "
        "an even number of DiT ranks (one half per CFG branch) plus the decode rank; got "
        "world size 4"
    )
    check_decode_plan(_parallel(cfg_parallel=True), _runner(), 3)
    check_decode_plan(_parallel(cfg_parallel=True), _runner(), 5)


def test_dedicated_with_quality_check_is_refused():
    with pytest.raises(ValueError, match=r"^runner.quality_check=true compares decoded chunks"):
        check_decode_plan(_parallel(), _runner(quality_check=True), 2)


def test_rank_counts_are_checked_only_when_known():
    check_decode_plan(_parallel(), _runner(), None)  # a sweep checked before launch
    with pytest.raises(ValueError, match="needs at least 2 ranks"):
        check_decode_plan(_parallel(), _runner(), 1)
    check_decode_plan(_parallel(decode="rank0"), _runner(), 1)
