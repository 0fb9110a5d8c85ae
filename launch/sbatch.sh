#!/usr/bin/env bash
# NODES=1 TASKS=2 launch/sbatch.sh [slug] [key=value ...]
# Submit to SLURM: the single-node template (one task per rank) when NODES=1,
# else the multi-node template (torchrun per node, c10d rendezvous).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${NODES:-1}" = 1 ]; then
  exec sbatch --ntasks-per-node="${TASKS:-1}" "$here/slurm/single_node.sbatch" "$@"
fi
exec sbatch --nodes="$NODES" "$here/slurm/multi_node.sbatch" "$@"
