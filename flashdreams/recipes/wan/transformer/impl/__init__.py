"""Wan DiT network internals: blocks, RoPE and the network itself."""
