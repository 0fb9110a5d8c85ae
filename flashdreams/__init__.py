"""FlashDreams-compatible streaming inference for video diffusion transformers."""

__version__ = "0.1.0"
