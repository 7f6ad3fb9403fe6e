#!/usr/bin/env bash
# Carry the default model (SmolLM2-135M-Instruct) to the GPU machine, as far as it fits.
#
# The weights do not fit the device tool's 64 MiB carry limit (GGUF Q4_1: 94 MiB; the converted
# fp32 safetensors: 513 MiB), so this packs the tokenizer and config only (~0.8 MiB xz) and the
# engine runs with random weights there: `--load-format dummy` (text is noise; shapes, kernels,
# KV sizes and transfers are the real model's).
#
# usage (repo root, here): scripts/device/stage-model.sh          -> .devmodel/smollm2-135m-instruct.tar.xz
#   carry: [".devmodel", ...]; device side:
#   mkdir -p /tmp/model && tar -xJf .devmodel/smollm2-135m-instruct.tar.xz -C /tmp/model
#   ... --model /tmp/model/smollm2-135m-instruct --load-format dummy
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
SRC=$("$PY" -c 'from engine.default_model import default_cache_dir, ensure_default_model
print(ensure_default_model(default_cache_dir()))')
mkdir -p .devmodel
NAME=$(basename "$SRC")
tar -C "$(dirname "$SRC")" -cJf ".devmodel/$NAME.tar.xz" \
  "$NAME/config.json" "$NAME/generation_config.json" "$NAME/tokenizer.json" "$NAME/tokenizer_config.json"
echo "$(du -k ".devmodel/$NAME.tar.xz" | cut -f1) KiB  .devmodel/$NAME.tar.xz  (no weights: --load-format dummy)"
