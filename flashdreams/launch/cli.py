"""``flashdreams-run`` console entry point (placeholder until the launcher lands)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flashdreams-run",
        description="Run a FlashDreams streaming video pipeline.",
    )
    parser.add_argument("slug", nargs="?", help="pipeline slug")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
