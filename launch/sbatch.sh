#!/usr/bin/env bash
# NODES=1 TASKS=2 launch/sbatch.sh [slug] [key=value ...]                 # CPU, one node, 2 ranks
# NODES=2 TASKS=8 GPUS=8 CPUS=32 launch/sbatch.sh wan21-t2v-14b ...       # GPU, 2 nodes x 8 ranks
# Submit to SLURM: the single-node template (one task per rank) when NODES=1,
# else the multi-node template (torchrun per node, c10d rendezvous, TASKS ranks per node).
# GPUS (per node) and CPUS (per task) are left to the cluster's defaults when unset.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
resources=()
[ -n "${GPUS:-}" ] && resources+=(--gpus-per-node="$GPUS")
[ -n "${CPUS:-}" ] && resources+=(--cpus-per-task="$CPUS")
if [ "${NODES:-1}" = 1 ]; then
  exec sbatch --ntasks-per-node="${TASKS:-1}" "${resources[@]}" "$here/slurm/single_node.sbatch" "$@"
fi
exec sbatch --nodes="$NODES" "${resources[@]}" \
  --export=ALL,RANKS_PER_NODE="${TASKS:-${GPUS:-1}}" "$here/slurm/multi_node.sbatch" "$@"
