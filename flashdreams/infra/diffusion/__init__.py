"""Diffusion model, transformer interface and schedulers."""
