#!/usr/bin/env bash
# Here, before a GPU run: the wheelhouse the GPU machine lacks (.whl, bench/gpu/wheelhouse.sh) and the
# default model's tokenizer files (.tok; the 98 MB model itself can't travel), both ignored by git and
# carried by the run:  run(command="bash bench/gpu/run.sh llama3.1-8b", carry=[".whl", ".tok"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash bench/gpu/wheelhouse.sh
mkdir -p .tok .git/info
grep -qxF "/.tok/" .git/info/exclude 2>/dev/null || echo "/.tok/" >> .git/info/exclude
model=$(.venv/bin/python -c "from server.model.default_model import default_model_dir; print(default_model_dir())")
cp "$model/tokenizer.json" "$model/tokenizer_config.json" .tok/
du -sh .whl .tok
