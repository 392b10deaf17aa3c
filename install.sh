#!/usr/bin/env bash
# Create .venv and install vla-scale into it (editable), keeping the CPU build of torch.
#   bash install.sh          # the package and its runtime dependencies
#   bash install.sh --test   # plus the test dependencies and the LIBERO extra
#                            # (about 2 GB more; the LIBERO tests need it)
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VLA_SCALE_VENV:-.venv}
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test,libero]"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: the default (CUDA) torch build and the real torchvision.
  pip install -q -e ".${extras}"
else
  # CPU machine: torch first, then everything else under constraints so that
  # nothing can replace it with a CUDA build. DeepSpeed builds no C++ ops here.
  pip install -q "torch==2.13.0"
  DS_BUILD_OPS=0 pip install -q -c constraints/cpu.txt -e ".${extras}"
  # There is no CPU torchvision build; the CUDA one that came in as a
  # dependency fails on import. Nothing of ours needs it.
  pip uninstall -q -y torchvision >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import torch, transformers, vla_scale; print(f'vla-scale installed: torch {torch.__version__}, transformers {transformers.__version__}')"
