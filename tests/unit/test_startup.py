"""The start-up clock behind ``stats.json``'s ``startup`` section."""

from __future__ import annotations

import time

import pytest

from flashdreams.runner.startup import StartupClock, process_age_s, startup_report


def test_process_age_is_the_time_since_this_process_started():
    age = process_age_s()
    assert age is not None  # Linux
    time.sleep(0.2)
    later = process_age_s()
    assert later - age == pytest.approx(0.2, abs=0.05)  # /proc counts in 10 ms ticks


def test_phases_are_the_gaps_between_marks_from_the_process_start():
    clock = StartupClock(origin=time.perf_counter() - 1.0)  # the process started 1 s ago
    time.sleep(0.05)
    clock.mark("config")
    time.sleep(0.1)
    clock.mark("build")
    durations = clock.durations()
    assert list(durations) == ["config_s", "build_s"]
    assert durations["config_s"] == pytest.approx(1.05, abs=0.03)
    assert durations["build_s"] == pytest.approx(0.1, abs=0.03)


def test_without_a_known_process_start_the_first_phase_and_ttff_are_unknown():
    clock = StartupClock(launch_known=False)
    clock.mark("config")
    clock.mark("build")
    assert list(clock.durations()) == ["build_s"]
    report = startup_report(
        clock,
        component_load_s={"decoder": 0.5},
        first_chunk_s=2.0,
        first_frame_at_s=3.0,
        compile_s=0.0,
        cuda_graph_capture_s=0.0,
    )
    assert report["time_to_first_frame_s"] is None
    assert report["component_load_s"] == {"decoder": 0.5} and report["first_chunk_s"] == 2.0
