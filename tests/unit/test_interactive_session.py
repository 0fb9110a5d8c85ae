"""Sessions over a tiny Wan pipeline: chunk-by-chunk stepping, switch receipts, controls,
several sessions over one model, telemetry and the errors for bad requests."""

from __future__ import annotations

import pytest
import torch
from test_prompt_switch import HEIGHT, WIDTH, run_chunks, tiny_wan_pipeline

from flashdreams.session import PromptSwitch, Session


def open_session(pipeline, **options):
    options = {"prompt": "a red ball", "height": HEIGHT, "width": WIDTH, **options}
    return Session.open(pipeline, **options)


def by_hand(pipeline, *, seed: int, num_chunks: int, switches: dict[int, str], recache=True):
    pipeline.diffusion_model.rng.manual_seed(seed)
    cache = pipeline.initialize_cache(
        ["a red ball"], height=HEIGHT, width=WIDTH, release_oneshot_encoders=False
    )
    latents = []
    for index in range(num_chunks):
        if index in switches:
            pipeline.switch_prompt(cache, [switches[index]], recache=recache)
        latents += run_chunks(pipeline, cache, [index])
    return latents


def test_switch_receipt_and_latents_equal_the_pipeline_switched_by_hand():
    pipeline = tiny_wan_pipeline()
    session = open_session(pipeline, seed=0)
    results = [session.step()]
    receipt = session.switch_prompt("a blue cube")
    assert (receipt.received_at_chunk, receipt.applied_at_chunk) == (1, None)
    results += [session.step(), session.step()]
    assert receipt.applied_at_chunk == 1 and results[1].switches == [receipt]
    assert session.prompt == "a blue cube"
    expected = by_hand(pipeline, seed=0, num_chunks=3, switches={1: "a blue cube"})
    for result, latent in zip(results, expected, strict=True):
        assert (result.latent - latent).abs().max().item() <= 1e-6
    summary = session.telemetry.summary()
    assert summary["num_chunks"] == 3 and summary["time_to_first_frame_s"] > 0
    assert summary["denoise_p95_s"] >= summary["denoise_p50_s"] > 0
    (switch,) = summary["switches"]
    assert (switch["received_at_chunk"], switch["applied_at_chunk"]) == (1, 1)
    assert 0 <= switch["apply_s"] <= switch["first_frame_s"]
    assert summary["cache_bytes"] == session.cache.transformer_cache.storage_bytes() > 0


def test_timeline_and_none_mode():
    pipeline = tiny_wan_pipeline()
    timeline = [PromptSwitch(0, "a red ball"), PromptSwitch(2, "a blue cube")]
    session = open_session(pipeline, seed=0, timeline=timeline, switch_mode="none")
    latents = [session.step().latent for _ in range(3)]
    expected = by_hand(pipeline, seed=0, num_chunks=3, switches={2: "a blue cube"}, recache=False)
    for latent, reference in zip(latents, expected, strict=True):
        assert (latent - reference).abs().max().item() <= 1e-6


def test_interleaved_sessions_equal_each_alone():
    pipeline = tiny_wan_pipeline()
    first = open_session(pipeline, seed=1)
    second = open_session(pipeline, seed=2, prompt="a green tree")
    interleaved: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for index in range(3):
        interleaved[1].append(first.step().latent)
        if index == 1:
            second.switch_prompt("a yellow boat")
        interleaved[2].append(second.step().latent)
    alone_first = open_session(pipeline, seed=1)
    alone_second = open_session(pipeline, seed=2, prompt="a green tree")
    for index in range(3):
        assert (alone_first.step().latent - interleaved[1][index]).abs().max() <= 1e-6
        if index == 1:
            alone_second.switch_prompt("a yellow boat")
        assert (alone_second.step().latent - interleaved[2][index]).abs().max() <= 1e-6
    assert (interleaved[1][0] - interleaved[2][0]).abs().max() > 1e-3


def test_bad_requests_name_the_value_and_lose_nothing():
    pipeline = tiny_wan_pipeline()
    session = open_session(pipeline, seed=0)
    first = session.step()
    with pytest.raises(ValueError, match=r"cannot switch to an empty prompt: ''"):
        session.switch_prompt("")
    with pytest.raises(ValueError, match=r"switch mode must be one of .*, got 'fast'"):
        session.switch_prompt("a blue cube", mode="fast")
    with pytest.raises(ValueError, match=r"control for chunk 0, which was already generated"):
        session.control(0, torch.zeros(1))
    second = session.step()  # the failed requests changed nothing
    expected = by_hand(pipeline, seed=0, num_chunks=2, switches={})
    assert (first.latent - expected[0]).abs().max() <= 1e-6
    assert (second.latent - expected[1]).abs().max() <= 1e-6
    session.close()
    assert session.cache is None
    with pytest.raises(ValueError, match=r"session 0 is closed \(after 2 chunks\)"):
        session.step()
    with pytest.raises(ValueError, match=r"session 0 is closed"):
        session.switch_prompt("a blue cube")
    with pytest.raises(ValueError, match=r"cannot switch to an empty prompt: '  '"):
        open_session(pipeline, prompt="  ")


def test_manager_steps_fairly_refuses_past_the_limit_and_frees_on_close():
    from flashdreams.session import SessionManager

    pipeline = tiny_wan_pipeline()
    manager = SessionManager(pipeline, max_sessions=2)
    first = manager.open(prompt="a red ball", height=HEIGHT, width=WIDTH, seed=1)
    second = manager.open(prompt="a green tree", height=HEIGHT, width=WIDTH, seed=2)
    with pytest.raises(ValueError, match=r"too many sessions: 2 open, max_sessions=2"):
        manager.open(prompt="a blue cube", height=HEIGHT, width=WIDTH)
    steps = [manager.step() for _ in range(2)]
    assert [sorted(step) for step in steps] == [[0, 1], [0, 1]]
    assert first.next_chunk == second.next_chunk == 2
    alone = open_session(pipeline, prompt="a green tree", seed=2)
    for step in steps:
        assert (step[1].latent - alone.step().latent).abs().max() <= 1e-6
    bytes_before = manager.cache_bytes()
    manager.close(0)
    assert first.closed and first.cache is None
    assert 0 < manager.cache_bytes() < bytes_before
    with pytest.raises(KeyError, match=r"no open session 0; open sessions: \[1\]"):
        manager.get(0)
    limited = SessionManager(pipeline, max_sessions=4, max_cache_bytes=bytes_before // 2 + 1)
    limited.open(prompt="a red ball", height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match=r"not enough cache memory for another session"):
        limited.open(prompt="a green tree", height=HEIGHT, width=WIDTH)
