#!/usr/bin/env bash
# On the GPU machine (source it, from the repository root, after carrying .whl): installs the
# wheelhouse made by bench/gpu/wheelhouse.sh beside the machine's own torch and transformers.
#     source bench/gpu/install.sh && python3 -m server serve --device cuda --model /tmp/ckpt ...
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
