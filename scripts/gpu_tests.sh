#!/bin/bash
# The GPU test suite on a lent GPU machine (see README: GPU tests). From the project root, with the
# wheels of ../shared/gpu/fetch-wheels.sh in .whl/. Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
python3 -c "import torch, transformers, trl, peft, accelerate, deepspeed, bitsandbytes as b; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, accelerate.__version__, deepspeed.__version__, b.__version__)" >> "$OUT/gpus.txt" 2>&1
python3 -m launcher gpus=1 train.max_steps=1 run_dir=/tmp/warm > "$OUT/warm.log" 2>&1  # builds the tiny model once, before the workers
export TEST_REPORT_FILE="$OUT/failures.txt" GPU_RUN_TIMEOUT_S=${GPU_RUN_TIMEOUT_S:-240}  # failures written as they happen (tests/conftest.py); a hung run fails with its rank logs
# SIGINT at LIMIT_S lets pytest print its summary before the lent machine's own per-command limit
timeout -s INT "${LIMIT_S:-3000}" python3 -m pytest -v -s -m gpu -n "${WORKERS:-8}" tests/test_gpu.py tests/test_lora_dropout_kernel.py "$@" 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "PASSED|FAILED|ERROR|GPU-CASE|passed|failed"
