"""Wan 2.1 / 2.2 recipes."""
