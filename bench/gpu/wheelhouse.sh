#!/usr/bin/env bash
# The wheels the lent GPU machine lacks to run the real server (it has torch, triton, transformers,
# peft, prometheus-client and pyyaml, and no internet): downloaded here, for its Python 3.12 on
# x86-64, into an ignored folder that a device run carries (`carry: [".whl"]`; well under 64 MiB).
# Versions are the ones pyproject.toml pins or this venv resolved (python-multipart: the control plane's
# form routes; websockets: its metrics socket; httpx: batch inference). Run from anywhere:
#     bench/gpu/wheelhouse.sh            # -> .whl/
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
mkdir -p "$out"
if [ -d .git ]; then mkdir -p .git/info; grep -qxF "/$out/" .git/info/exclude 2>/dev/null || echo "/$out/" >> .git/info/exclude; fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux1_x86_64 -d "$out" \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 sse-starlette==3.7.0 pydantic==2.14.3 \
  pydantic-core==2.50.4 llguidance==1.9.1 annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 \
  click==8.5.1 h11==0.16.0 idna==3.20 sniffio==1.3.1 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  python-multipart==0.0.34 websockets==17.4 opentelemetry-api==1.45.2 httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.18
ls "$out" | wc -l | xargs echo "wheels in $out:"
du -sh "$out"
