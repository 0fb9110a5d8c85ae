"""Several sessions batched into one forward equal the same sessions run alone."""

from __future__ import annotations

import pytest
import torch
from test_prompt_switch import HEIGHT, WIDTH, tiny_wan_pipeline

from flashdreams.session import Session, SessionManager
from flashdreams.session import batch as batch_module

TOL = 1e-5
NUM_CHUNKS = 8  # past the window (4 latent frames of 1-frame chunks) and a sink


SESSIONS = [
    {"prompt": "a red ball", "seed": 11},
    {"prompt": "a green tree by a lake", "seed": 22},
    {"prompt": "a blue cube", "seed": 33},
]
SWITCHES = {3: (1, "a yellow boat", "recache"), 5: (0, "a purple sky", "none")}
"""chunk -> (session, prompt, mode): requested before that chunk."""


def run_manager(pipeline, num_sessions: int, *, batch: bool, switches=SWITCHES):
    manager = SessionManager(pipeline, max_sessions=num_sessions, batch=batch)
    sessions = [
        manager.open(height=HEIGHT, width=WIDTH, **options) for options in SESSIONS[:num_sessions]
    ]
    latents: list[list[torch.Tensor]] = [[] for _ in sessions]
    for index in range(NUM_CHUNKS):
        if index in switches and switches[index][0] < num_sessions:
            entry, prompt, mode = switches[index]
            sessions[entry].switch_prompt(prompt, mode=mode)
        for entry, result in manager.step().items():
            latents[entry].append(result.latent)
    return latents, manager


def count_batched_steps(monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = batch_module.step_batched

    def spy(streams):
        sizes.append(len(streams))
        return original(streams)

    monkeypatch.setattr("flashdreams.session.manager.step_batched", spy)
    return sizes


@pytest.mark.parametrize("num_sessions", [2, 3])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_batched_sessions_equal_each_alone(monkeypatch, num_sessions, guidance_scale):
    transformer = {"sink_size_t": 1, "guidance_scale": guidance_scale}
    pipeline = tiny_wan_pipeline(context_noise=100, **transformer)
    sizes = count_batched_steps(monkeypatch)
    batched, _ = run_manager(pipeline, num_sessions, batch=True)
    assert sizes == [num_sessions] * NUM_CHUNKS  # every chunk ran as one batch
    alone, _ = run_manager(
        tiny_wan_pipeline(context_noise=100, **transformer), num_sessions, batch=False
    )
    assert sizes == [num_sessions] * NUM_CHUNKS  # batch=False stepped one by one
    for entry in range(num_sessions):
        for index in range(NUM_CHUNKS):
            error = (batched[entry][index] - alone[entry][index]).abs().max().item()
            assert error <= TOL, (entry, index, error)
    # the sessions differ (prompts and seeds), so rows were not mixed up
    assert (batched[0][-1] - batched[1][-1]).abs().max() > 1e-3


def test_a_session_opened_later_or_with_a_control_steps_alone_then_joins(monkeypatch):
    pipeline = tiny_wan_pipeline()
    sizes = count_batched_steps(monkeypatch)
    manager = SessionManager(pipeline, max_sessions=3)
    first = manager.open(prompt="a red ball", height=HEIGHT, width=WIDTH, seed=1)
    second = manager.open(prompt="a green tree", height=HEIGHT, width=WIDTH, seed=2)
    results = [manager.step()]
    late = manager.open(prompt="a blue cube", height=HEIGHT, width=WIDTH, seed=3)
    results.append(manager.step())  # chunk 1 of the first two, chunk 0 of the late one
    assert sizes == [2, 2]
    closed = first.next_chunk
    manager.close(0)
    results.append(manager.step())
    assert sizes == [2, 2] and (second.next_chunk, late.next_chunk) == (closed + 1, 2)
    alone = Session.open(pipeline, prompt="a green tree", height=HEIGHT, width=WIDTH, seed=2)
    for step in results:
        assert (step[1].latent - alone.step().latent).abs().max() <= TOL
    late_alone = Session.open(pipeline, prompt="a blue cube", height=HEIGHT, width=WIDTH, seed=3)
    for step in results[1:]:
        assert (step[2].latent - late_alone.step().latent).abs().max() <= TOL


def test_max_batch_size_splits_the_batch(monkeypatch):
    pipeline = tiny_wan_pipeline()
    sizes = count_batched_steps(monkeypatch)
    manager = SessionManager(pipeline, max_sessions=3, max_batch_size=2)
    for options in SESSIONS:
        manager.open(height=HEIGHT, width=WIDTH, **options)
    manager.step()
    assert sizes == [2]
    with pytest.raises(ValueError, match=r"max_batch_size must be >= 1, got 0"):
        SessionManager(pipeline, max_sessions=2, max_batch_size=0)
