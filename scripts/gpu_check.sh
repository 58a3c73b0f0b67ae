#!/usr/bin/env bash
# The one prepared GPU check (device tool or any NVIDIA machine; about 7 minutes). Prints:
#  1. tests/gpu, plainly and again under PyTorch's CUDA sanitizer (TORCH_CUDA_SANITIZER=1 reports
#     tensors used across streams without synchronization);
#  2. `fuyou profile --quick`;
#  3. benchmarks/gpu_check.py: ZO2 (OPT-2.7B fp16) and AdamW (OPT-1.3B bf16) at 2048 tokens through the
#     real CLI, in memory / streamed / under a device limit / from SSD: one table, each row against its
#     plan, the in-memory run and the link or disk bound; then where the streamed AdamW steps went (fp32
#     and compact states), with their --trace files under $OUT/work.
# Needs a Python with torch + CUDA; builds its own models, no network. Logs under $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fuyou-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export FUYOU_CACHE_DIR=${FUYOU_CACHE_DIR:-$OUT/cache}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# Packages the image may lack travel as wheels in .whl (see the device tool's README).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
echo "== tests/gpu"
timeout 100 python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== tests/gpu under TORCH_CUDA_SANITIZER=1"
TORCH_CUDA_SANITIZER=1 timeout 100 python3 -m pytest -q -x tests/gpu/test_first_order_cuda.py 2>&1 | tee "$OUT/gpu_tests_sanitizer.log" | tail -25
echo "== fuyou profile --quick"
mkdir -p "$OUT/swap"
timeout 60 python3 -m fuyoucli profile --quick --disk "$OUT/swap" 2>&1 | tee "$OUT/profile.log" | tail -30
echo "== runs through the CLI"
timeout 380 python3 benchmarks/gpu_check.py --skip-profile --work "$OUT/work" --timeout 40 2>&1 | tee "$OUT/gpu_check.log"
