#!/usr/bin/env bash
# The one prepared GPU check of issue 12 (benchmarks/gpu_check.py): Wan2.1 1.3B and 14B with
# random weights, bf16, 480p and 720p x 81 frames, on one H100/H200 in <= 8 minutes, no
# downloads. It prints one report line per case and writes $OUT/gpu_check.json and .log
# ($OUT defaults to the current directory).
#
# The GPU machine's image has torch, peft and transformers but not diffusers or pydantic, and
# reaches no registry. So, where a registry is reachable (this repo's checkout), once:
#     bash benchmarks/gpu_check.sh --fetch-wheels    # -> .whl/ (git-ignored through info/exclude)
# then on the GPU machine, with `.whl` carried:
#     bash benchmarks/gpu_check.sh                    # ~7 minutes; extra args go to gpu_check.py
# (With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=560).) Cases run cheapest first; on an H100 the 14B 720p case reports that it does
# not fit one GPU (>= 88 GiB: weights + checkpointed block inputs); on an H200 it needs ~3
# minutes for one step, so give it its own run:
#     bash benchmarks/gpu_check.sh --models 14b --res 720p
# The CPU dry run (tiny configs, the same code path; tests/test_gpu_check.py runs it):
#     bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The versions this project's environment pins, for CPython 3.12 (the GPU image's python3).
WHEELS=(diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==10.2.0
        zipp==4.1.2)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi

if ! "$PY" -c "import diffusers, pydantic, peft" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site=${TMPDIR:-/tmp}/gpu_check_site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: $PY cannot import diffusers, pydantic and peft, and there is no .whl/" \
             "to install them from: run 'bash benchmarks/gpu_check.sh --fetch-wheels' where a" \
             "package registry is reachable and carry .whl to this machine" >&2
        exit 2
    fi
fi

out=${OUT:-.}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Freed activations of one case go back for the next (OOM in a naive step included).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# The script budgets itself (--budget-s, default 420 s); the timeout is a backstop.
timeout 480 "$PY" benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@" 2>&1 \
    | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
