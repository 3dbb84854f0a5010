#!/usr/bin/env bash
# The embedded engine's GPU checks in one run, on a machine with one CUDA GPU (docs/backends.md, "GPU"):
#   1. the model's parity tests on the GPU: float32 against the eager reference and Hugging Face transformers,
#      bfloat16 (flash attention with the lower-right causal mask) against the float32 reference;
#   2. bench/engine_prefix.py at the Llama-3-8B shape, bfloat16, 8k-token prompts, against an eager transformers
#      forward, with the default chunked prefill (SGLang's choice by GPU memory: 8192 on an H100/H200, so one chunk)
#      and in 2048-token chunks (attention over the cached chunks through the lower-right causal bias).
# PYTHON (default .venv/bin/python) must import torch built with CUDA, transformers and the llmpath parts.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
status=0

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("# torch", torch.__version__, "on", torch.cuda.get_device_name())' || exit 1

for dtype in float32 bfloat16; do
    tests=(tests/backends/test_engine_model.py)
    [ "$dtype" = float32 ] && tests+=(tests/backends/test_engine_matches_transformers.py)
    echo "# parity tests on cuda, $dtype"
    LLMPATH_TEST_DEVICE=cuda LLMPATH_TEST_DTYPE=$dtype \
        "$PY" -m pytest -q -p no:cacheprovider --noconftest -o addopts= "${tests[@]}" || status=1
done

for chunk in default 2048; do
    args=(--device cuda --preset llama-8b --prompt-tokens 8192 --trials 5)
    if [ "$chunk" = default ]; then args+=(--compare-eager); else args+=(--chunked-prefill-size "$chunk"); fi
    echo "# bench/engine_prefix.py ${args[*]}"
    "$PY" bench/engine_prefix.py "${args[@]}" || status=1
done
exit $status
