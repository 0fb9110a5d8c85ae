"""Swappable abstractions: config system, encoder / diffusion model / decoder, pipeline."""
