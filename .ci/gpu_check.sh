#!/usr/bin/env bash
# The GPU check, one prepared script: the tests marked `gpu` (and the CUDA tests of the other
# files), then `toolkit bench gpu`: the seed recipe at 220×220 in bf16, with and without
# channels_last and torch.compile, images/s per GPU, share of the bf16 peak, and the loader's
# samples/s with min(16, cores) workers. Expected 5-6 minutes on an H200 (not yet timed);
# it stops by ~8.
#
#   .ci/gpu_check.sh                      in an environment where the toolkit's dependencies
#                                         import (a CUDA build of torch); no install needed
#   OUT=DIR                               where the outputs go (default: a new temporary folder)
#   PYTHON=...                            the interpreter (default: .venv/bin/python, else python3)
#   GPU_CHECK_DTYPES=bf16,fp32            add the fp32 rows (two more compiles: ~1-2 min more)
#
# Outputs: gpu_tests.log/.xml, bench_gpu.json (rewritten after every configuration, so a
# stopped run keeps what it measured), bench_gpu.log (progress and the markdown table),
# env.txt, nvidia-smi.txt, summary.txt. Exit 0 when every part passed.
# Without CUDA: one line {"check": "gpu", "skipped": true, ...}, exit 0.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
probe="$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>&1 | tail -n 1)"
if [ "$probe" = cpu ]; then
  line='{"check": "gpu", "skipped": true, "reason": "no CUDA device: torch.cuda.is_available() is False"}'
  echo "$line"
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && echo "$line" > "$OUT/gpu_check.json"; fi
  exit 0
elif [ "$probe" != cuda ]; then
  echo "gpu_check: cannot import torch with $PY: $probe" >&2
  exit 1
fi

OUT_DIR="${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$OUT_DIR"
echo "gpu_check: outputs in $OUT_DIR"
WORK="$(mktemp -d -t gpu-check-work-XXXXXX)"  # generated data and W&B files: not among the outputs
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's toolkit, installed or not
export TOOLKIT_CACHE="$WORK/cache" WANDB_MODE=disabled WANDB_DIR="$WORK" PYTHONWARNINGS=ignore

start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" - > "$OUT_DIR/env.txt" 2>&1 <<'EOF'
import os, platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpus", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("cpu cores", len(os.sched_getaffinity(0)), "python", platform.python_version())
EOF

# 1. Tests (at most 270 s): every test marked gpu, then the CUDA tests that live with their subjects.
timeout -k 10 270 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ --junitxml="$OUT_DIR/gpu_tests.xml" \
  > "$OUT_DIR/gpu_tests.log" 2>&1
tests_rc=$?
left=$(( 300 - $(elapsed) ))
if [ "$left" -gt 30 ]; then
  timeout -k 10 "$left" "$PY" -m pytest -q -p no:cacheprovider tests/test_embed.py::test_precision_auto_on_gpu \
    tests/test_embed.py::test_short_run_on_gpu_with_auto_precision tests/test_knn.py::test_cuda_tensors_match_sklearn \
    >> "$OUT_DIR/gpu_tests.log" 2>&1
  other_rc=$?
else
  echo "gpu_check: no time left for the other CUDA tests" >> "$OUT_DIR/gpu_tests.log"
  other_rc=124
fi

# 2. The benchmark, in what is left of ~8 minutes (it starts no configuration after --budget_s).
left=$(( 470 - $(elapsed) ))
budget=$(( left > 90 ? left - 60 : 30 ))
timeout -k 10 "$left" "$PY" -m toolkit bench gpu --dtypes "${GPU_CHECK_DTYPES:-bf16}" --budget_s "$budget" \
  --out "$OUT_DIR/bench_gpu.json" > "$OUT_DIR/bench_gpu.stdout" 2> "$OUT_DIR/bench_gpu.log"
bench_rc=$?

{
  echo "gpu_check: $(elapsed) s; tests rc $tests_rc (gpu-marked), $other_rc (other CUDA tests); bench rc $bench_rc"
  grep -E "passed|failed|error|skipped" "$OUT_DIR/gpu_tests.log" | tail -n 2
  sed -n '/^GPU: /,$p' "$OUT_DIR/bench_gpu.log"
} | tee "$OUT_DIR/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$other_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
