# Sourced by the scripts/gpu_*.sh: the environment every command on a lent GPU machine needs.
# Installs the wheels of ../shared/gpu/fetch-wheels.sh (in .whl/) once per machine, keeps NVLink multicast
# off (../shared/gpu/README.md) and makes $OUT.
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
[ -d /tmp/site/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export LAUNCHER_CACHE=/tmp/launcher-cache HF_DATASETS_CACHE=/tmp/hf-datasets
