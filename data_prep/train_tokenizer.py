"""Train a tokenizer from local files or a HF dataset: sentencepiece (BPE or unigram, byte
fallback; the default) or, with --kind hf-bpe, a Hugging Face byte-level BPE (`tokenizers`).

Writes OUT/tokenizer.model + OUT/tokenizer.vocab (sentencepiece) or OUT/tokenizer.json +
tokenizer_config.json + special_tokens_map.json (hf-bpe; AutoTokenizer loads the folder), and
OUT/tokenizer_info.json (settings, content hash, special ids: unk=0 bos=1 eos=2 pad=3).

  python data_prep/train_tokenizer.py out/demo/demo_corpus.jsonl --out out/demo/tokenizer --vocab-size 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamor.cli import ArgumentParser
from megamor.data.cli import add_input_args, main_guard, read_options


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--kind", choices=("sentencepiece", "hf-bpe"), default="sentencepiece",
                   help="sentencepiece model, or a Hugging Face byte-level BPE (tokenizer.json)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=5_000_000,
                   help="sentencepiece's reservoir sample of input lines (bounds memory)")
    p.add_argument("--sample-fraction", type=float, default=1.0,
                   help="keep this seeded fraction of documents (bounds reading time on large corpora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=8,
                   help="sentencepiece threads; the result depends on it, so it is a setting, not the core count")
    p.add_argument("--soft-vocab-limit", action="store_true",
                   help="allow a smaller vocabulary than --vocab-size when the corpus is too small for it")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    from megamor.data.tokenizer_train import train_tokenizer

    tok = train_tokenizer(
        a.inputs, a.out, vocab_size=a.vocab_size, model_type=a.model_type, character_coverage=a.character_coverage,
        max_sentences=a.max_sentences, sample_fraction=a.sample_fraction, seed=a.seed, num_threads=a.num_threads,
        read=read_options(a), hf_split=a.hf_split, allow_empty_inputs=a.allow_empty_inputs, soft_vocab_limit=a.soft_vocab_limit,
        overwrite=a.overwrite, kind=a.kind,
    )
    print(f"wrote {tok.path} (vocab {tok.vocab_size}, sha256 {tok.content_hash[:16]}; "
          f"unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id})")
    return 0


if __name__ == "__main__":
    main_guard(main)
