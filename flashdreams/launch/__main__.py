"""``python -m flashdreams.launch [slug] [key=value ...]`` (same as ``flashdreams-run``)."""

from flashdreams.launch.cli import main

raise SystemExit(main())
