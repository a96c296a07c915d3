#!/usr/bin/env bash
# GPU throughput benchmark for a device machine: one prepared script, under 8 minutes on an H100.
#
# The device machine has torch and transformers but no network, no open_clip and no faiss. Before
# sending the tree there, download the wheels ict_core needs for the tokenizer into bench/wheels/
# (never commit them; bench/wheels/ is for carrying only):
#
#     pip download open-clip-torch ftfy regex wcwidth --no-deps -d bench/wheels
#     # only if the device's python lacks torchvision (open_clip imports it): a torchvision wheel built
#     # for the device's torch version, e.g. pip download "torchvision==<matching>" --no-deps -d bench/wheels
#
# Then, from the repository root on the device machine:
#
#     OUT=/path/to/results bash bench/gpu.sh            # ViT-H-14 shapes (default)
#     OUT=/tmp/g bash bench/gpu.sh --tiny               # smoke test: tiny CLIP, runs on CPU too
#
# faiss is not needed (the benchmark never searches a gallery). Without an importable open_clip the
# bench still runs, with synthetic token ids (recorded in gpu.json as "tokenizer").
# Writes $OUT/gpu.json, $OUT/gpu_throughput.png (when matplotlib is installed), $OUT/env.txt, $OUT/log.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_BENCH_TIMEOUT:-450}"     # hard stop, leaves headroom under 8 minutes
mkdir -p "$OUT"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import sys, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Offline install of the carried wheels (no index, no dependency resolution: nothing is downloaded here).
if ! "$PY" -c "import open_clip" >/dev/null 2>&1; then
  shopt -s nullglob
  wheels=(bench/wheels/*.whl)
  if (( ${#wheels[@]} )); then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links bench/wheels "${wheels[@]}" \
      || echo "warning: pip install of bench/wheels failed" >&2
  else
    echo "warning: no wheels in bench/wheels/ and open_clip is not installed (see the top of this script)" >&2
  fi
fi
"$PY" -c "import open_clip; print('open_clip', open_clip.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt" || true

export PYTHONUNBUFFERED=1
timeout "$BUDGET_S" "$PY" bench/gpu_bench.py --out "$OUT" --budget $(( BUDGET_S - 90 )) "$@" 2>&1 | tee "$OUT/log.txt"
