#!/usr/bin/env bash
# One-shot GPU check for a session that is lent an H100/H200 (the device tool's stack:
# torch + triton, no torchao/executorch/gguf, no network). Run from the repository root:
#
#     bash benchmarks/gpu_session.sh            # logs and JSON under ${OUT:-/tmp/babai_gpu}
#
# The lent machine has no torchao; carry its wheel (3.4 MB) for the tensor-subclass tests:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0
# and call the device tool with carry [".whl"]. Without it only the torch + triton tests run.
#
# 1. makes babai_ao importable without pip (a copy of babai_ao/ with kernels/, passes/ and
#    export/ linked in as babai_ao.kernels/.passes/.export, as pyproject's package-dir does);
# 2. the kernel tests that need torch + triton only, on the GPU for real (no interpreter);
# 3. kernels_gpu.py (decode latency, GB/s vs copy bandwidth, SSQR, HPTQ, tinygemm int4);
# 4. decode_llama.py (compiled 1B Llama-shaped decode tokens/s, bf16 vs 4-bit).
# (`python3 -P`: the checkout's own babai_ao/ lacks the linked subpackages, so not on sys.path.)
# Each step has its own timeout so one hang does not eat the lease; about 9 minutes in all.
set -u
OUT=${OUT:-/tmp/babai_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/babai_site TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
rm -rf /tmp/babai_site && mkdir -p /tmp/babai_site
cp -r babai_ao /tmp/babai_site/babai_ao
for sub in kernels passes export; do ln -s "$PWD/$sub" "/tmp/babai_site/babai_ao/$sub"; done
TESTS="tests/test_kernels.py tests/test_kernels_hptq.py tests/test_kernels_cuda_trace.py"
SELECT="not smollm2"
if ls .whl/torchao-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/babai_site .whl/*.whl
else
  echo "no .whl/torchao wheel: running the torch + triton kernel tests only"
  TESTS="tests/test_kernels.py tests/test_kernels_cuda_trace.py"
  SELECT="not smollm2 and not prepare_cpu"
fi

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"

# shellcheck disable=SC2086
timeout 240 python3 -P -m pytest -q -p no:cacheprovider $TESTS tests/test_kernels_sm90.py \
    -k "$SELECT" 2>&1 | tail -25 | tee "$OUT/tests.txt"

timeout 300 python3 benchmarks/kernels_gpu.py --group-size 128 --hptq \
    --json "$OUT/kernels_gpu.json" 2>&1 | tee "$OUT/kernels_gpu.txt"

timeout 180 python3 benchmarks/decode_llama.py --config 1b --tokens 64 \
    --json "$OUT/decode_llama.json" 2>&1 | tail -20 | tee "$OUT/decode_llama.txt"
