#!/usr/bin/env bash
# NPROC=2 launch/torchrun.sh [slug] [key=value ...]
# NPROC ranks on this machine; the context-parallel size is NPROC.
set -euo pipefail
exec torchrun --standalone --nproc_per_node="${NPROC:-2}" --no-python flashdreams-run "$@"
