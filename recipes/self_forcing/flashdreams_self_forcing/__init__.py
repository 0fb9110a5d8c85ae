"""Self-Forcing plugin: registers its slugs and its checkpoint remap with flashdreams.

Self-Forcing is a causal (chunk-by-chunk) Wan 2.1 T2V 1.3B distilled to a
4-step flow-matching schedule ([1000, 750, 500, 250], shift 5.0) that
generates 3 latent frames per chunk while attending to a KV cache of the
last 21 latent frames. The pipelines themselves are defined in
``conf/pipeline/*.yaml`` next to this file.
"""

from __future__ import annotations

from flashdreams.runner.registry import RunnerEntry

SELF_FORCING_1PT3B = RunnerEntry(
    slug="self-forcing-1.3b",
    description="Self-Forcing causal Wan 2.1 1.3B: 4 steps [1000, 750, 500, 250], shift 5.0, 3 latent frames per chunk.",
    runner="self-forcing",
    conf_package="flashdreams_self_forcing.conf",
)
SELF_FORCING_TINY = RunnerEntry(
    slug="self-forcing-tiny",
    description="Tiny random-weight Self-Forcing layout (4 steps, 3 latent frames per chunk) for CPU runs.",
    runner="self-forcing-tiny",
    conf_package="flashdreams_self_forcing.conf",
)

CHECKPOINT_KEY_PATTERNS = [
    (r"^generator_ema\.model\.", ""),
    (r"^generator\.model\.", ""),
    (r"^model\.", ""),
]
"""Self-Forcing checkpoints nest the Wan weights under ``generator_ema.model.``
(EMA weights, preferred) or ``generator.model.``."""


def self_forcing_state_dict_transform(state_dict):
    """Keep the generator weights of a Self-Forcing checkpoint, with Wan key names.

    Prefers the EMA generator when the checkpoint holds both.
    """
    from flashdreams.core.checkpoint import remap_checkpoint_keys

    prefix = "generator_ema." if any(k.startswith("generator_ema.") for k in state_dict) else None
    if prefix is None and any(k.startswith("generator.") for k in state_dict):
        prefix = "generator."
    if prefix is not None:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    return remap_checkpoint_keys(state_dict, CHECKPOINT_KEY_PATTERNS)
