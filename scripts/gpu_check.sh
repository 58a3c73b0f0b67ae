#!/usr/bin/env bash
# The one prepared GPU check: CUDA tests, then a short ZO2 benchmark. Meant for the device tool
# (an H200 box with its own torch): finishes in well under 5 minutes. Output under $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fuyou-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# Packages the image may lack travel as wheels in .whl (see the device tool's README).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
timeout 200 python3 -m pytest -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
timeout 80 python3 benchmarks/zo2.py --quick --device cuda 2>&1 | tee "$OUT/zo2_bench.log"
