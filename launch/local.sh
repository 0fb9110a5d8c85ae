#!/usr/bin/env bash
# launch/local.sh [slug] [key=value ...]
# One process on this machine (CPU or one GPU).
set -euo pipefail
exec flashdreams-run "$@"
