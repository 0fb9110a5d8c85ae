"""Live LoRA swaps in a session (``Session.swap_loras``), tiny random Wan pipelines, fp32.

A swap at chunk k with ``recache`` equals a fresh pipeline built with the new adapters
that commits the same history (the latents the session generated before the swap) and
then generates chunk k from the same noise; ``mode="none"`` keeps the history's
self-attention K/V of the old adapters and differs. Bad requests are clear errors.
"""

from __future__ import annotations

import re

import pytest
from test_prompt_switch import HEIGHT, WIDTH, hand_built_recache, run_chunks, tiny_wan_pipeline
from test_wan_lora import _save, _tensors

from flashdreams.recipes.wan.lora import LoRAConfig
from flashdreams.session import Session, SessionManager

NUM_BEFORE = 2
PROMPT = "a red ball"


def _pipeline(path, *, guidance_scale: float, fused: bool):
    loras = [LoRAConfig(path=str(path), fused=fused)]
    return tiny_wan_pipeline(guidance_scale=guidance_scale, loras=loras)


def _swapped_session(old, new, *, guidance_scale, fused, mode):
    """``NUM_BEFORE`` chunks under ``old``, a swap to ``new``, one more chunk."""
    pipeline = _pipeline(old, guidance_scale=guidance_scale, fused=fused)
    session = Session.open(pipeline, prompt=PROMPT, height=HEIGHT, width=WIDTH, seed=0)
    before = [session.step().latent for _ in range(NUM_BEFORE)]
    receipt = session.swap_loras([LoRAConfig(path=str(new), fused=fused)], mode=mode)
    after = session.step()
    assert after.lora_swaps == [receipt] and after.switches == []
    return before, after.latent, receipt, pipeline.text_encoder


@pytest.mark.parametrize(
    "guidance_scale, fused", [(1.0, True), (3.0, False)], ids=["fused", "cfg-runtime"]
)
def test_live_swap_with_recache_equals_a_fresh_pipeline_on_the_same_history(
    tmp_path, guidance_scale, fused
):
    # the adapters touch self-attention q/k/v and the text path (text_embedding, cross k)
    old = _save(tmp_path, "old", _tensors(seed=21))
    new = _save(tmp_path, "new", _tensors(seed=22))
    before, recached, receipt, text_encoder = _swapped_session(
        old, new, guidance_scale=guidance_scale, fused=fused, mode="recache"
    )
    assert (receipt.received_at_chunk, receipt.applied_at_chunk) == (NUM_BEFORE, NUM_BEFORE)
    assert receipt.adapters == ["new"] and receipt.received_s <= receipt.applied_s
    assert receipt.applied_s <= receipt.first_frame_s
    _, kept_none, _, _ = _swapped_session(
        old, new, guidance_scale=guidance_scale, fused=fused, mode="none"
    )
    # Reference: a pipeline loaded with the new adapters, the session's history committed
    # at its positions, then chunk NUM_BEFORE from the same noise.
    fresh = _pipeline(new, guidance_scale=guidance_scale, fused=fused)
    fresh.text_encoder = text_encoder  # random weights drawn when built: use the same one
    fresh.diffusion_model.rng.manual_seed(0)
    throwaway = fresh.initialize_cache([PROMPT], height=HEIGHT, width=WIDTH)
    run_chunks(fresh, throwaway, range(NUM_BEFORE))  # noise draws do not depend on weights
    rng_state = fresh.diffusion_model.rng.get_state()
    reference = hand_built_recache(
        fresh, before, rng_state, range(NUM_BEFORE), prompt=PROMPT, next_index=NUM_BEFORE
    )
    assert (recached - reference).abs().max().item() <= 1e-5
    # Without the re-cache the history keeps the old adapters' K/V: measurably different.
    assert (kept_none - reference).abs().max().item() > 1e-3


def test_swap_by_callable_and_to_no_adapters(tmp_path):
    old = _save(tmp_path, "old", _tensors(seed=21))
    pipeline = _pipeline(old, guidance_scale=1.0, fused=True)
    session = Session.open(pipeline, prompt=PROMPT, height=HEIGHT, width=WIDTH, seed=0)
    session.step()
    halve = session.swap_loras(lambda transformer: transformer.loras.set_strength("old", 0.5))
    assert pipeline.transformer.loras.strength("old") == 1.0  # nothing before the boundary
    session.step()
    assert pipeline.transformer.loras.strength("old") == 0.5 and halve.adapters == ["old"]
    cleared = session.swap_loras([], mode="none")
    assert session.step().lora_swaps == [cleared] and pipeline.transformer.loras.names == []


def test_bad_swap_requests(tmp_path):
    old = _save(tmp_path, "old", _tensors(seed=21))
    pipeline = _pipeline(old, guidance_scale=1.0, fused=True)
    session = Session.open(pipeline, prompt=PROMPT, height=HEIGHT, width=WIDTH, seed=0)
    with pytest.raises(
        ValueError, match=re.escape("switch mode must be one of ('recache', 'none'), got 'fast'")
    ):
        session.swap_loras([old], mode="fast")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "swap_loras takes a list of adapters (LoRAConfig, path or LoRAAdapter) or a "
            "callable change(transformer), got PosixPath"
        ),
    ):
        session.swap_loras(old)
    session.swap_loras([tmp_path / "missing.safetensors"])
    switch = session.switch_prompt("a blue cube")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        session.step()
    assert pipeline.transformer.loras.names == ["old"] and session.next_chunk == 0
    # the failed swap was dropped; the prompt switch of that boundary waited
    assert session.step().switches == [switch] and switch.applied_at_chunk == 0
    session.close()
    with pytest.raises(ValueError, match=re.escape("session 0 is closed (after 1 chunks)")):
        session.swap_loras([])
    manager = SessionManager(pipeline, max_sessions=2)
    first = manager.open(prompt=PROMPT, height=HEIGHT, width=WIDTH)
    manager.open(prompt="a green tree", height=HEIGHT, width=WIDTH)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "session 0: cannot swap LoRA adapters while 2 sessions are open ([0, 1]): the "
            "adapters live on the model every session shares; close the other sessions first"
        ),
    ):
        first.swap_loras([])
    manager.close(1)
    assert first.swap_loras([]).mode == "recache"  # alone again: allowed
