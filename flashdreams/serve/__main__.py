"""``python -m flashdreams.serve <slug> [key=value ...]`` (same as ``flashdreams-serve``)."""

from flashdreams.serve.cli import main

raise SystemExit(main())
