"""A servable model directory for `--load-format dummy` runs of a shape-only config.

engine/model_configs/<name>/ holds config.json only; the router needs a tokenizer whose
vocabulary covers every id the model can emit (runtime.tokenizer rejects ids beyond it). This
writes config.json (copied) and a word-level tokenizer.json with exactly `vocab_size` tokens
("t0" .. "tN-1", whitespace-split), so that token-id prompts go in and any sampled id decodes.
The text it produces is noise, like the dummy weights behind it; shapes, KV sizes, kernels and
transfers are the real model's.

    python3 scripts/device/dummy_model_dir.py engine/model_configs/llama-3.1-8b /tmp/llama-3.1-8b
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit


def build(config_dir: Path, out: Path) -> Path:
    config = json.loads((config_dir / "config.json").read_text())
    vocab_size = int(config["vocab_size"])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out / "config.json")
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1 << 20}) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} CONFIG_DIR OUT_DIR")
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
