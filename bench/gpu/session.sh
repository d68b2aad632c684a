#!/usr/bin/env bash
# On the lent GPU machine, one call (after bench/gpu/prepare.sh here):
#     run(command="bash bench/gpu/session.sh", carry=[".whl", ".tok"], timeout_s=600)
# 1. checks: the Triton LoRA kernels on CUDA tensors (tests/test_lora_triton.py), and the real server
#    on CUDA (graphs, Triton LoRA, fp32) against transformers + peft for a few architectures
#    (tests/test_architectures.py; ARCHS picks them);
# 2. runner-level decode steps against the bandwidth floor (bench/gpu_decode.py; DECODE_SHAPES picks
#    the shapes: llama3-8b, qwen3-8b), base steps also with the fused elementwise kernels off, and a
#    kernel profile of a base and a mixed step;
#    LORA_SWEEP=1: the LoRA kernels' launch settings swept (bench/gpu_lora_kernels.py), then the decode
#    step with the best of them;
# 3. the real server end to end (bench/gpu_serve.py via run.sh), BUDGET_S seconds of scenarios.
# Everything lands in $OUT. SKIP_CHECK=1, SKIP_DECODE=1, SKIP_PROFILE=1, SKIP_SERVE=1 skip parts.
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
source bench/gpu/install.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_CHECK:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_lora_triton.py tests/test_fused_triton.py 2>&1 | tail -3
  LORASERVE_TEST_TOKENIZER_DIR=$PWD/.tok timeout 200 python3 -m pytest -q -p no:cacheprovider -x \
    tests/test_architectures.py -k "${ARCHS:-llama3 or qwen3-yarn or gemma3_text}" 2>&1 | tail -5
fi
if [ -z "${SKIP_DECODE:-}" ]; then
  for shape in ${DECODE_SHAPES:-llama3-8b}; do
    python3 bench/gpu_decode.py --shape "$shape" --batches "${BATCHES:-1,8,32,64}" --torch-ops \
      --out "$out/gpu_decode-$shape.json" 2>&1 | grep -v Warning | tee -a "$out/gpu_decode.log"
  done
fi
if [ -n "${LORA_SWEEP:-}" ]; then  # the LoRA kernels' launch settings, then the decode step with the best
  python3 bench/gpu_lora_kernels.py --rows "${SWEEP_ROWS:-1,64}" --out "$out/gpu_lora_kernels.json" 2>&1 \
    | tee "$out/gpu_lora_kernels.log"
  best=$(python3 -c "import json,collections; r=json.load(open('$out/gpu_lora_kernels.json'))['results']; t=collections.Counter()
for x in r: t[(x['target_programs'], x['expand_block'])] += x['us_per_layer']
print(*min(t, key=t.get))")
  echo "best LoRA launch settings (target programs, expand block): $best"
  set -- $best
  python3 bench/gpu_decode.py --shape llama3-8b --batches 1,64 --lora-target-programs "$1" --lora-expand-block "$2" \
    --out "$out/gpu_decode-llama3-8b-lora-best.json" 2>&1 | grep -v Warning | tee -a "$out/gpu_decode.log"
  set --
fi
if [ -z "${SKIP_PROFILE:-}" ]; then
  python3 bench/gpu_decode.py --shape llama3-8b --batches 64 --steps 8 --profile > "$out/profile-64.txt" 2>&1
  python3 bench/gpu_decode.py --shape llama3-8b --batches 1 --steps 8 --profile > "$out/profile-1.txt" 2>&1
fi
if [ -z "${SKIP_SERVE:-}" ]; then
  bash bench/gpu/run.sh "${SHAPE:-llama3.1-8b}" --budget-s "${BUDGET_S:-330}" "$@"
  grep -i -E "error|traceback|captured" "$out"/gpu_serve-*.log | head -20
fi
