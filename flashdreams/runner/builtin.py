"""Built-in slugs; registered as ``flashdreams.runner_configs`` entry points in pyproject.toml.

Each pipeline itself is defined once, in ``conf/pipeline/<slug>.yaml``.
"""

from __future__ import annotations

from flashdreams.runner.registry import RunnerEntry

WAN_TINY_T2V = RunnerEntry(
    slug="wan-tiny-t2v",
    description="Tiny random-weight Wan T2V pipeline for CPU smoke runs.",
    runner="tiny",
)
WAN_TINY_I2V = RunnerEntry(
    slug="wan-tiny-i2v",
    description="Tiny random-weight Wan I2V pipeline for CPU smoke runs (first frame from runner.image).",
    runner="tiny",
)
WAN21_T2V_1PT3B = RunnerEntry(
    slug="wan21-t2v-1.3b",
    description="Wan 2.1 T2V 1.3B, 480p, UniPC 50 steps, shift 5.0, guidance 5.0.",
    runner="wan-480p",
)
WAN21_T2V_14B = RunnerEntry(
    slug="wan21-t2v-14b",
    description="Wan 2.1 T2V 14B, 720p, UniPC 50 steps, shift 5.0, guidance 5.0.",
    runner="wan-720p",
)
WAN21_I2V_14B_480P = RunnerEntry(
    slug="wan21-i2v-14b-480p",
    description="Wan 2.1 I2V 14B 480p (CLIP + VAE first frame), UniPC 40 steps, shift 3.0, guidance 5.0.",
    runner="wan-480p",
)
WAN22_TI2V_5B = RunnerEntry(
    slug="wan22-ti2v-5b",
    description="Wan 2.2 TI2V 5B (48-channel VAE, 16x spatial), UniPC 50 steps, shift 5.0, guidance 5.0.",
    runner="wan22-5b",
)
WAN22_T2V_A14B = RunnerEntry(
    slug="wan22-t2v-a14b",
    description="Wan 2.2 T2V A14B (high/low-noise experts, boundary 0.875), UniPC 40 steps, shift 12.0.",
    runner="wan-720p",
)
