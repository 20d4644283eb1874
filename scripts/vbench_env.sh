#!/usr/bin/env bash
# Create the isolated VBench environment the evaluate stage calls as a subprocess.
#
#   scripts/vbench_env.sh [VENV]        # default .venv-vbench (or $REGDPO_VBENCH_VENV); `make vbench-env`
#
# Why a second venv: vbench 0.1.5 pins transformers==4.33.2 and numpy<2, and needs torchvision,
# decord, openai-clip and pyiqa; the training environment has transformers 5, numpy 2 and must
# not get torchvision. Nothing here downloads model weights: those live in the configured cache
# dir (evaluate.vbench.cache_dir) and the evaluate stage lists any that are missing before work.
#
# Idempotent: a stamp records the pins; re-running with the same pins does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-${REGDPO_VBENCH_VENV:-.venv-vbench}}
PY=${PYTHON:-python3}
# torch 2.14.1 + torchvision 0.29.1: the PyPI (CUDA 13) builds, which the local mirror here serves
# offline and which run on CPU too (~6.5 GB with the nvidia libraries). The CPU-only torch 2.13
# wheel does not work: PyPI's torchvision 0.28 links libtorch_cuda, so its ops fail to register
# and `import torchvision` raises "operator torchvision::nms does not exist".
TORCH=${REGDPO_VBENCH_TORCH:-torch==2.14.1}
TORCHVISION=${REGDPO_VBENCH_TORCHVISION:-torchvision==0.29.1}
# pyiqa 0.1.10 is the last release without a transformers pin that clashes with vbench's 4.33.2;
# openai-clip imports pkg_resources, which setuptools 81 dropped (torch 2.14 wants >= 77.0.3).
PINS=(vbench==0.1.5 pyiqa==0.1.10 transformers==4.33.2 "numpy<2" "timm<=1.0.12" "setuptools>=77.0.3,<81")

stamp="$VENV/.regdpo-vbench"
want="$TORCH $TORCHVISION ${PINS[*]}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "vbench env: ready ($VENV)"
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH" "$TORCHVISION"
# The pins in one resolve, with torch held where it is (an unpinned resolve would pull CUDA torch).
"$VENV/bin/python" -m pip install -q "${PINS[@]}" "$TORCH" "$TORCHVISION"
# Import every module the six dimensions use, so a broken env fails here and not mid-evaluation.
"$VENV/bin/python" - <<'EOF'
import importlib
for name in ("vbench", "vbench.subject_consistency", "vbench.background_consistency",
             "vbench.motion_smoothness", "vbench.dynamic_degree", "vbench.aesthetic_quality",
             "vbench.imaging_quality", "vbench.temporal_flickering"):
    importlib.import_module(name)
import numpy, transformers, torch
print(f"vbench env: torch {torch.__version__}, numpy {numpy.__version__}, transformers {transformers.__version__}")
EOF
echo "$want" > "$stamp"
echo "vbench env: ready ($VENV) in $(( $(date +%s) - start )) s"
