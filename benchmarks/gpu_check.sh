#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine (docs/performance.md, "On a GPU").
#
#   bash benchmarks/gpu_check.sh prepare   # here, on a machine that reaches PyPI: fills .gpu_wheels/
#   bash benchmarks/gpu_check.sh           # there: the GPU tests, then the GPU benchmark rows
#
# The device machine runs its image's python3 (PyTorch with CUDA, transformers, pytest) and
# reaches no package index, so `prepare` downloads what that image lacks (DeepSpeed and its
# pydantic/hjson) as wheels for its Python (GPU_PYTHON, default 3.12, x86-64), pinned to the
# versions in .venv.  Through the device tool: run(command="bash benchmarks/gpu_check.sh",
# carry=[".gpu_wheels"], timeout_s=600; ~7 minutes expected).  Output goes to $OUT/gpu_check.log (and the console);
# pytest's report to $OUT/gpu_tests.xml.  Stages are ordered cheapest-first and each has its own
# time limit, so a stage that runs long costs only the stages after it.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels

if [ "${1:-}" = prepare ]; then
  set -e
  PY=.venv/bin/python
  GPU_PYTHON=${GPU_PYTHON:-3.12}
  pin() { "$PY" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin hjson)" "$(pin annotated_types)" "$(pin typing_inspection)" \
    "$(pin typing_extensions)"
  # DeepSpeed ships as source: built here into a pure-Python wheel (no ops prebuilt; it detects
  # the CUDA accelerator at run time and JIT-builds ops only if asked, which megallama never is)
  src=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$(pin deepspeed)"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$src"/deepspeed-*.tar.gz
  rm -rf "$src"
  ls -1 "$WHEELS"
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
unset DS_ACCELERATOR
exec > >(tee "$OUT/gpu_check.log") 2>&1
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, report its exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
stage machine 30 bash -ec "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", \
  transformers.__version__); assert torch.cuda.is_available(), \"torch sees no CUDA GPU\"'"
if [ $status -ne 0 ]; then
  echo "gpu_check: no usable CUDA GPU here (see above); nothing else to check"
  exit 2
fi
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  stage install 120 "$PY" -m pip install -q --no-index --find-links "$WHEELS" deepspeed
fi
stage tests 300 "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_gpu.py tests/test_kernels.py \
  tests/test_model_hf.py tests/test_model_ops.py --junitxml="$OUT/gpu_tests.xml"
stage "throughput: model and megallama train" 180 "$PY" benchmarks/gpu_throughput.py --preset llama-1b --batch 4
stage "throughput: selective recompute" 100 "$PY" benchmarks/gpu_throughput.py --preset llama-1b --batch 4 \
  --checkpointing selective --no-engine
stage "throughput: compiled blocks" 200 "$PY" benchmarks/gpu_throughput.py --preset llama-1b --batch 4 --compile \
  --no-engine
echo "== done: $([ $status -eq 0 ] && echo all stages passed || echo some stage FAILED)"
exit $status
