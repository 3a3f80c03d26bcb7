"""Train the byte-level BPE tokenizer shared by the embedded tiny model and the test models.

    python scripts/build_tokenizer.py  # writes quantize/testing/assets/tokenizer/

Trained on the bundled WikiText-2 validation split; deterministic for the same tokenizers version.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "calibration" / "wikitext2" / "valid.txt"
OUT = ROOT / "quantize" / "testing" / "assets" / "tokenizer"
VOCAB = 1024
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>"]


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|bos|>",
                "eos_token": "<|eos|>",
                "pad_token": "<|pad|>",
                "model_max_length": 4096,
                "add_bos_token": False,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {OUT} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
