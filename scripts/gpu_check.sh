#!/usr/bin/env bash
# On a CUDA machine: the oracle checks in bf16 (scripts/gpu/test_cuda.py: bf16 fidelity, DoRA,
# int8 and bitsandbytes 8/4-bit, compile with both KV caches, two GPUs), the benchmark matrix
# at the server's default flags, then the single-workload benchmark on the GPU in bf16 (pinned host memory and non-blocking copies for tier promotion are what
# the server uses on CUDA). Results go to $OUT (the device tool's folder) or ./gpu-results.
#
# Needs python3 with CUDA torch, transformers, peft and the packages in pyproject.toml. Wheels
# for what the machine lacks can sit in .whl/ (see the device tool's README); they are
# installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/client:$PWD/service:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
# torchao (for --quantization int8) must be installed or carried in .whl/.
python3 -m pytest -q -s -p no:cacheprovider scripts/gpu/test_cuda.py 2>&1 | tee "$out/gpu-tests.log"
# The matrix at the server's default flags (device auto = CUDA, dtype auto = the checkpoint's 16-bit).
python3 -m loramux.bench.matrix --out "$out/matrix" 2>&1 | tee "$out/matrix.log"
python3 -m loramux.bench --device cuda --dtype bfloat16 --out "$out" 2>&1 | tee "$out/bench.log"
python3 -m loramux.bench.merge --out "$out" 2>&1 | tee "$out/merge.log"
python3 -m loramux.bench.inference_options --out "$out" 2>&1 | tee "$out/inference-options.log"
python3 -m loramux.bench.quantization --out "$out" 2>&1 | tee "$out/quantization.log"
