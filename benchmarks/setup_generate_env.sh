#!/usr/bin/env bash
# The environment of bench_generate.py's baselines: the project plus onnxruntime-genai and
# llama-cpp-python (built from source, ~15 min on 2 cores) and llama.cpp's GGUF converter from
# the same source distribution. Never CI's environment, never the runtime's dependencies.
#
#   bash benchmarks/setup_generate_env.sh            # -> .venv-bench, .cache/llama-cpp-src
#   export CONVERT_HF_TO_GGUF=$(cat .cache/llama-cpp-src/CONVERTER)
#   .venv-bench/bin/python benchmarks/bench_generate.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bench}
SRC=.cache/llama-cpp-src
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0          # first: an unpinned torch pulls a CUDA build
"$VENV/bin/pip" install -q -e ".[compile,runtime,torch]" onnxruntime-genai onnx-ir gguf sentencepiece
if [ "${SKIP_LLAMA_CPP:-0}" != 1 ]; then
  "$VENV/bin/pip" install -q llama-cpp-python     # compiles llama.cpp for this CPU (-march=native)
  mkdir -p "$SRC"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: llama-cpp-python -d "$SRC"
  tar -xzf "$SRC"/llama_cpp_python-*.tar.gz -C "$SRC"
  find "$SRC" -name convert_hf_to_gguf.py | head -1 > "$SRC/CONVERTER"
  echo "converter: $(cat "$SRC/CONVERTER")"
fi
