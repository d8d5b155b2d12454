#!/usr/bin/env bash
# On a CUDA machine, in about 8 minutes (at most 9.5 by its timeouts), most valuable first, each part under its own
# timeout and writing its results as it goes (a second run may not be possible):
#   1. scripts/gpu/step.py: the decode step at h4096 bf16 with 16 and 64 rows: plain
#      transformers eager and as one CUDA graph (the floor), loramux base and 16/64 distinct
#      adapters with the torch kernel, the Triton kernels, and --cuda-graphs; CUDA kernels per
#      step; bytes against bandwidth; then a prefill of 16 x 512 tokens, base against 16
#      adapters through each kernel                                                   (~2 min)
#   2. scripts/gpu/test_cuda.py, the fidelity and serving checks: bf16 against float32 peft
#      for loramux and peft; Triton kernels and CUDA graphs against the eager server; the
#      engine in its own process on CUDA; pinned host tier; DoRA (compile, quantization and
#      two GPUs: FULL=1)                                                              (~2 min)
#   3. the matrix at h2048 with bfloat16 checkpoints (so --dtype auto serves bfloat16), at
#      the server's defaults                                                          (~3 min)
#   4. the front doors against the engine alone: the engine thread's time per step with the
#      gRPC and HTTP doors in its process, against none, and both doors of a server whose
#      engine runs in its own process (--engine-process: its default on a GPU)       (~1.5 min)
# FULL=1 adds the matrix with --lora-kernel triton --cuda-graphs, the matrix with
# --no-overlap-steps (what queuing each step ahead gives, against step 3), compile with both KV caches,
# quantization (needs torchao and bitsandbytes) and the other benchmarks (join_policy: whether
# waiting requests should join at the next step on a GPU too), which do not fit.
# Results go to $OUT (the device tool's folder) or ./gpu-results.
#
# Needs python3 with CUDA torch (and the Triton it brings), transformers, peft and the packages
# in pyproject.toml. Wheels for what the machine lacks can sit in .whl/ (scripts/gpu/fetch_wheels.sh
# downloads them, by scripts/gpu/wheels.txt); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/client:$PWD/service:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
started=$SECONDS
note() { echo "[gpu_check $((SECONDS - started)) s] $*" | tee -a "$out/summary.txt"; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$out/versions.txt" || exit 1

note "1. decode step"
timeout 160 python3 scripts/gpu/step.py --out "$out/step.json" > "$out/step.log" 2>&1
note "step.py exit $? ($(grep -c '"ms"' "$out/step.json" 2>/dev/null || echo 0) timings)"

note "2. CUDA checks"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -k "not quantized and not compiled and not two_gpus" \
    scripts/gpu/test_cuda.py > "$out/gpu-tests.log" 2>&1
note "test_cuda.py exit $?: $(tail -1 "$out/gpu-tests.log")"

note "3. matrix h2048, bfloat16 checkpoints, default flags"
timeout 180 python3 -m loramux.bench.matrix --models 2048 --checkpoint-dtype bfloat16 --out "$out/matrix" \
    > "$out/matrix.log" 2>&1
note "matrix exit $?"

note "4. front doors against the engine alone"
timeout 80 python3 -m loramux.bench.front_doors --out "$out" > "$out/front-doors.log" 2>&1
note "front_doors exit $?: $(tail -1 "$out/front_doors.md" 2>/dev/null)"

if [[ "${FULL:-0}" == 1 ]]; then
    python3 -m loramux.bench.matrix --models 2048 --checkpoint-dtype bfloat16 --set lora_kernel=triton \
        --set kv_cache=static --set cuda_graphs=true --out "$out/matrix-graphs" > "$out/matrix-graphs.log" 2>&1
    python3 -m loramux.bench.matrix --models 2048 --checkpoint-dtype bfloat16 --set overlap_steps=false \
        --out "$out/matrix-no-overlap" > "$out/matrix-no-overlap.log" 2>&1
    python3 -m pytest -q -s -p no:cacheprovider scripts/gpu/test_cuda.py -k "quantized or compiled or two_gpus" \
        > "$out/gpu-full-tests.log" 2>&1
    python3 -m loramux.bench --device cuda --dtype bfloat16 --out "$out" > "$out/bench.log" 2>&1
    python3 -m loramux.bench.merge --out "$out" > "$out/merge.log" 2>&1
    python3 -m loramux.bench.inference_options --out "$out" > "$out/inference-options.log" 2>&1
    python3 -m loramux.bench.quantization --out "$out" > "$out/quantization.log" 2>&1
    python3 -m loramux.bench.join_policy --out "$out" > "$out/join-policy.log" 2>&1
fi
note "done"
