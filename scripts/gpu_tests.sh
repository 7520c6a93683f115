#!/bin/bash
# The GPU test suite on a lent GPU machine (see README: GPU tests). From the project root, with the
# wheels of ../shared/gpu/fetch-wheels.sh in .whl/. Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -d /tmp/site/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  ; export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export LAUNCHER_CACHE=/tmp/launcher-cache HF_DATASETS_CACHE=/tmp/hf-datasets PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
python3 -c "import torch, transformers, trl, peft, accelerate, deepspeed, bitsandbytes as b; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, accelerate.__version__, deepspeed.__version__, b.__version__)" >> "$OUT/gpus.txt" 2>&1
python3 -m launcher gpus=1 train.max_steps=1 run_dir=/tmp/warm > "$OUT/warm.log" 2>&1  # builds the tiny model once, before the workers
python3 -m pytest -v -s -m gpu -n "${WORKERS:-8}" tests/test_gpu.py "$@" 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "PASSED|FAILED|ERROR|GPU-CASE|passed|failed"
