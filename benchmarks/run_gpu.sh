#!/usr/bin/env bash
# What produced the GPU numbers in BENCHMARKS.md, on one GPU, as one batch.
#   bash benchmarks/run_gpu.sh OUT_DIR
# Expects the project's missing dependencies as wheels in .whl/ (see BENCHMARKS.md)
# and installs vla-scale itself into /tmp/site, then runs from outside the checkout
# so that the installed package (with vla_scale.kernels) is the one imported.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: run_gpu.sh OUT_DIR}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site "$REPO"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd /tmp
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# 1. The framework on this machine's torch/transformers/streaming (training's bit-exact resume
#    tests are CPU-fp32 properties and are not run here; step 3 trains on the GPU).
timeout 240 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_models.py" "$REPO/tests/test_policy.py" \
  "$REPO/tests/test_data_pipeline.py" "$REPO/tests/test_config.py" -k "not two_ranks" 2>&1 | tail -15 | tee "$OUT/tests.txt"
# 2. Action decoding: VLAPolicy (eager and static-cache decoders) vs generate at B = 1, 8, 32, ~1B LLM (bf16),
#    ms/action, Hz, passes/action, ms per pass against the weight-bandwidth floor; the policy server's tests.
timeout 300 python3 "$REPO/benchmarks/decode.py" --device cuda --sizes 2048x20 --repeats 10 \
  --out "$OUT/decode_cuda.json" 2>&1 | tail -12 | tee "$OUT/decode.txt"
#    decode.py's static_lean column: the lean LLM pass (vla_scale.policy.lean, CPU default) on the GPU; its
#    static_graphs column: the whole decode replayed as one captured CUDA graph (VLAPolicy(cuda_graphs=True));
#    test_policy_static.py -k graphed checks the captured decode against the eager one on cuda.
timeout 120 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_policy_static.py" "$REPO/tests/test_serve.py" \
  "$REPO/tests/test_kernels.py" "$REPO/tests/test_policy_lean.py" 2>&1 | tail -8 | tee -a "$OUT/tests.txt"
# 2b. ~7B (hidden 4096, 32 layers, random weights): opt in, it builds and saves a 7B source first (slow).
if [[ "${VLA_SCALE_GPU_7B:-0}" == "1" ]]; then
  timeout 900 python3 "$REPO/benchmarks/decode.py" --device cuda --sizes 4096x32 --batches 1,8 --repeats 5 \
    --out "$OUT/decode_cuda_7b.json" 2>&1 | tail -8 | tee "$OUT/decode_7b.txt"
fi
# 2c. Projector: the per-shape choice (two GEMMs / Triton / cat) measured at the OpenVLA+ shape.
VLA_SCALE_CONCAT_LINEAR_TUNE=1 timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/concat_linear_choice.txt"
import torch
from vla_scale.kernels.concat_linear import concat_linear_choices, fused_concat_linear
xf, xt = (torch.randn(8192, d, device="cuda", dtype=torch.bfloat16) for d in (1152, 1024))
w = (torch.randn(8704, 2176, device="cuda") * 2176 ** -0.5).bfloat16().requires_grad_()
b = torch.zeros(8704, device="cuda", dtype=torch.bfloat16, requires_grad=True)
with torch.no_grad():
    fused_concat_linear(xf, xt, w, b)            # inference shape
fused_concat_linear(xf, xt.requires_grad_(), w, b).sum().backward()  # training shape
for key, choice in concat_linear_choices().items():
    print(key, choice)
PY
# 3. Training step, ~1B-parameter LLM, bf16: bare loop vs single vs ZeRO-3 (NCCL, 1 rank), tokens/s, MFU.
timeout 300 python3 "$REPO/benchmarks/train_step.py" --llm-hidden 2048 --llm-layers 20 --global-batch 32 \
  --micro-batch 16 --image-size 224 --ranks 1 --steps 10 --warmup 3 --repeats 1 --peak-tflops 989 \
  --out "$OUT/train_step_cuda.json" 2>&1 | tail -25 | tee "$OUT/train_step.txt"
