#!/usr/bin/env bash
# Install LLaMA-Factory (PyPI `llamafactory`) into a virtual environment of its own, where
# `python bench/train_throughput.py --peer llamafactory` finds it:
#   ${LORAKIT_LLAMAFACTORY_VENV:-${LORAKIT_HOME:-~/.cache/lorakit}/llamafactory-venv}
# LLaMA-Factory pins its own transformers (<= 5.6), peft, accelerate and trl, so it cannot share
# lorakit's environment. torch is installed first, pinned, which takes a CPU build here (an
# unpinned one pulls a CUDA build). PyPI's torchvision / torchaudio / torchcodec, which
# llamafactory requires, do not load beside that CPU torch and its text training never uses them:
# they are removed, and an empty `torchaudio` module is put on the venv's path for the imports
# that still name it.
# Idempotent: a venv whose llamafactory already imports is kept (a second run takes seconds).
set -euo pipefail
VENV="${LORAKIT_LLAMAFACTORY_VENV:-${LORAKIT_HOME:-$HOME/.cache/lorakit}/llamafactory-venv}"
LLAMAFACTORY_VERSION="${LLAMAFACTORY_VERSION:-0.9.5}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"  # the CPU build of torch this machine's pip takes
PY="${PYTHON:-python3}"
check='import llamafactory, llamafactory.train.tuner; print(llamafactory.__version__)'
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "LLaMA-Factory $("$VENV/bin/python" -c "$check" 2>/dev/null | tail -1) is installed in $VENV"
    exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "llamafactory==$LLAMAFACTORY_VERSION"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# An empty torchaudio: llamafactory imports it at start-up (audio datasets only), and PyPI's
# build does not load beside the CPU torch.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$SITE/torchaudio"
printf '"""Empty stand-in: the CPU torch here has no matching torchaudio; text training needs none."""\n' \
    >"$SITE/torchaudio/__init__.py"
"$VENV/bin/python" -c "$check" | tail -1 | sed "s|^|LLaMA-Factory |; s|\$| installed in $VENV|"
