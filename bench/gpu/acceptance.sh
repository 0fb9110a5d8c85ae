#!/usr/bin/env bash
# One-call GPU acceptance run for a machine with one H100 / H200.
#
#   bash bench/gpu/acceptance.sh            # real run: needs CUDA; appends a table to bench/RESULTS.md
#   bash bench/gpu/acceptance.sh --dry-run  # the same plumbing on CPU at toy sizes; records nothing
#
# Steps, in order (each one's output goes to a log file; a failed step prints its tail):
#   setup       installs the project (editable, with its test tools) when it is not importable
#   env         python / torch / CUDA facts; the real run stops here without a CUDA device
#   gpu-tests   python -m pytest -q tests/gpu
#   bench-gpu   bench/gpu/bench_gpu.py: eager / compile / CUDA graphs per AR step at the
#               Self-Forcing 1.3B shape (480x832, bf16), Wan VAE and TAEHV decode, e2e FPS
#   torchrun    a 1-GPU torchrun run of wan-tiny-t2v over NCCL (gloo in the dry run)
#   cold-start  bench/bench_coldstart.py: Wan 2.1 1.3B transformer build from a bf16
#               safetensors file vs reading the file's bytes (on the GPU in the real run)
#
# Prints one markdown table (step, status, seconds, what it measured) and exits non-zero if
# any step failed; every step runs even after an earlier one failed, so one run shows all.
# Nothing is interactive. Budget: under 8 minutes on one H100 including compilation.
set -uo pipefail

DRY_RUN=0
for argument in "$@"; do
  case "$argument" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "acceptance.sh: unknown argument '$argument' (use --dry-run or --help)" >&2
      exit 2
      ;;
  esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT" || exit 2
PYTHON="${PYTHON:-python}"
LOG_DIR="$(mktemp -d -t flashdreams-acceptance.XXXXXX)"
export PYTHONUNBUFFERED=1

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()
STEP_NOTES=()
NUM_FAILED=0

# run_step NAME NOTE_COMMAND -- COMMAND...
# Runs COMMAND with its output in $LOG_DIR/NAME.log; NOTE_COMMAND (a shell snippet reading
# that log on stdin) turns the output into the table's "measured" cell.
run_step() {
  local name="$1" note_command="$2"
  shift 3
  local log="$LOG_DIR/$name.log" started ended status note
  echo "== $name: $*"
  started=$(date +%s.%N)
  "$@" >"$log" 2>&1
  status=$?
  ended=$(date +%s.%N)
  if [ "$status" -eq 0 ]; then
    note=$(bash -c "$note_command" <"$log" 2>/dev/null | tr '\n' ' ' | sed 's/|/\\|/g')
    STEP_STATUS+=("pass")
  else
    note="exit $status; log $log"
    STEP_STATUS+=("**FAIL**")
    NUM_FAILED=$((NUM_FAILED + 1))
    echo "-- $name failed (exit $status); last lines of $log:"
    tail -n 25 "$log"
  fi
  STEP_NAMES+=("$name")
  STEP_SECONDS+=("$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')")
  STEP_NOTES+=("$note")
}

install_project() {
  if "$PYTHON" -c "import flashdreams, flashdreams_self_forcing" 2>/dev/null; then
    echo "flashdreams already importable: $("$PYTHON" -c 'import flashdreams; print(flashdreams.__file__)')"
    return 0
  fi
  if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    # On a GPU machine the default PyPI build of torch is the CUDA one.
    "$PYTHON" -m pip install "torch>=2.4,<2.15" || return 1
  fi
  "$PYTHON" -m pip install -e '.[dev]' -e recipes/self_forcing
}

describe_environment() {
  "$PYTHON" - "$DRY_RUN" <<'EOF'
import sys

import torch

dry_run = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    print(f"device {properties.name}, {properties.total_memory / 2**30:.0f} GiB")
elif dry_run:
    print("device CPU (dry run)")
else:
    sys.exit("no CUDA device: the acceptance run needs one GPU (use --dry-run on CPU)")
EOF
}

torchrun_smoke() {
  local backend="$1" output_dir="$LOG_DIR/torchrun-run"
  torchrun --standalone --nproc_per_node=1 --no-python flashdreams-run wan-tiny-t2v \
    "parallel.backend=$backend" runner.num_chunks=2 "runner.output_dir=$output_dir" || return $?
  "$PYTHON" - "$output_dir" <<'EOF'
import json
import sys
from pathlib import Path

stats = json.loads((Path(sys.argv[1]) / "stats.json").read_text())
if stats.get("status", "completed") != "completed":
    sys.exit(f"stats.json status is {stats.get('status')!r}")
print(f"torchrun-ok world={stats.get('world_size')} chunks={len(stats.get('chunks', []))}")
EOF
}

if [ "$DRY_RUN" -eq 1 ]; then
  BENCH_GPU_ARGS=(--smoke)
  COLD_START_ARGS=(--smoke --components dit,vae)
  TORCHRUN_BACKEND=gloo
else
  BENCH_GPU_ARGS=(--record --label acceptance)
  COLD_START_ARGS=(--device cuda --record --label acceptance)
  TORCHRUN_BACKEND=nccl
fi

run_step setup "tail -n 1" -- install_project
run_step env "cat" -- describe_environment
run_step gpu-tests "grep -E '[0-9]+ (passed|skipped|failed)' | tail -n 1" -- \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu
run_step bench-gpu "grep -E '^\| [a-z]+ \| (wan-vae|taehv) \|' | awk -F'|' '{printf \"%s/%s: %s ms, %s FPS; \", \$2, \$3, \$5, \$6}'" -- \
  "$PYTHON" bench/gpu/bench_gpu.py "${BENCH_GPU_ARGS[@]}"
run_step torchrun "grep torchrun-ok" -- torchrun_smoke "$TORCHRUN_BACKEND"
run_step cold-start "grep -E '^ratio' | tr '\n' ' '" -- \
  "$PYTHON" bench/bench_coldstart.py "${COLD_START_ARGS[@]}"

TABLE="| step | status | seconds | measured |
|---|---|---|---|"
for index in "${!STEP_NAMES[@]}"; do
  TABLE+="
| ${STEP_NAMES[$index]} | ${STEP_STATUS[$index]} | ${STEP_SECONDS[$index]} | ${STEP_NOTES[$index]} |"
done

echo
echo "$TABLE"
echo
echo "logs: $LOG_DIR"

if [ "$DRY_RUN" -eq 0 ]; then
  {
    echo
    echo "### GPU acceptance run"
    echo
    echo "Command: \`bash bench/gpu/acceptance.sh\`  "
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$TABLE"
  } >>bench/RESULTS.md
  echo "[appended to bench/RESULTS.md]"
fi

if [ "$NUM_FAILED" -gt 0 ]; then
  echo "acceptance: $NUM_FAILED step(s) failed" >&2
  exit 1
fi
echo "acceptance: all steps passed"
