#!/usr/bin/env bash
# On the lent GPU machine, from the repository root, after bench/gpu/prepare.sh ran here:
#     run(command="bash bench/gpu/run.sh llama3.1-8b", carry=[".whl", ".tok"], timeout_s=600)
# Installs the wheelhouse, writes the 8B-shaped checkpoint and adapters under /tmp (random weights,
# ~16 GB + ~1.3 GB), serves it and runs the scenarios of bench/gpu_serve.py within one command's
# 10 minutes (the report is rewritten after each scenario, so a cut-off run still returns its part).
# More arguments go to bench/gpu_serve.py (e.g. --concurrency 1 64 --budget-s 400).
set -euo pipefail
shape=${1:-llama3.1-8b}
source bench/gpu/install.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# A GPU node's limits: batches of up to 128 rows (graphed), their KV reserved, 24 adapters of 84 MB resident.
limits=(--max-batch-size=128 --cuda-graph-max-batch-size=128 --max-batch-total-tokens=400000
        --max-concurrent-requests=512 --max-adapter-memory-mb=4096)
python3 bench/gpu_serve.py --shape "$shape" --tokenizer .tok --device cuda \
    --out "${OUT:-/tmp}/gpu_serve-$shape.json" "${limits[@]/#/--server-arg=}" "${@:2}"
