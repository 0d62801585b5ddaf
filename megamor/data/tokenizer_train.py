"""Train a tokenizer from the same inputs tokenize_and_shard reads: a sentencepiece model
(kind "sentencepiece", BPE or unigram) or a Hugging Face byte-level BPE (kind "hf-bpe").

Documents are fed to sentencepiece line by line ("\\n" is a user-defined piece, so lines never
need to contain it). For large corpora two knobs bound the cost: `sample_fraction` keeps a
seeded, content-hashed fraction of documents (unbiased across files, unlike "the first N MB"),
and `max_sentences` is sentencepiece's own reservoir sample (bounds memory).
Training is deterministic for a given (inputs, settings, seed, num_threads); sentencepiece's
result depends on the thread count, which is therefore a fixed setting, not the core count.

"hf-bpe" trains `tokenizers`' BPE over GPT-2 style byte-level pieces (no unknown characters;
digits split one per token, as the sentencepiece models) with megamor's special tokens at the
same ids (<unk>=0 <s>=1 </s>=2 <pad>=3), and writes tokenizer.json, tokenizer_config.json and
special_tokens_map.json: a folder `load_tokenizer` and `AutoTokenizer.from_pretrained` load.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from megamor.data.errors import DataError, OutputExistsError
from megamor.data.readers import ReadOptions, ReadStats, iter_documents
from megamor.data.sources import plan_units, resolve_sources
from megamor.data.tokenizer import (
    HF_FILE,
    INFO_FILE,
    MODEL_FILE,
    VOCAB_FILE,
    SentencePieceTokenizer,
    Tokenizer,
    file_sha256,
    load_tokenizer,
)
from megamor.utils.atomic import atomic_open, fsync_path, write_json

UNK, BOS, EOS, PAD = 0, 1, 2, 3
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")  # at ids UNK, BOS, EOS, PAD: sentencepiece's defaults
KINDS = ("sentencepiece", "hf-bpe")
MAX_SENTENCE_BYTES = 16384  # longer lines are cut into pieces for training only
_WHOLE = 1 << 62


def keep_document(text_bytes: bytes, seed: int, fraction: float) -> bool:
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(text_bytes, digest_size=8, key=seed.to_bytes(8, "little", signed=False)).digest()
    return int.from_bytes(h, "little") < int(fraction * 2**64)


def _sentences(inputs: Sequence[str], opts: ReadOptions, stats: ReadStats, sample_fraction: float, seed: int,
               hf_split: str, allow_empty: bool, failure: list[DataError]) -> Iterator[str]:
    """Lines for sentencepiece. A DataError ends the stream and is kept in `failure`: raised
    through sentencepiece it would come back as a multi-line RuntimeError."""
    try:
        yield from _read_sentences(inputs, opts, stats, sample_fraction, seed, hf_split, allow_empty)
    except DataError as e:
        failure.append(e)


def _read_sentences(inputs: Sequence[str], opts: ReadOptions, stats: ReadStats, sample_fraction: float, seed: int,
                    hf_split: str, allow_empty: bool) -> Iterator[str]:
    sources, _ = resolve_sources(inputs, hf_split=hf_split, allow_empty=allow_empty)
    for unit in plan_units(sources, opts.txt_mode, _WHOLE, _WHOLE):
        for doc in iter_documents(sources[unit.source], unit, opts, stats):
            if not keep_document(doc.encode("utf-8", "replace"), seed, sample_fraction):
                continue
            for line in doc.split("\n"):
                while line:
                    piece, line = line[: MAX_SENTENCE_BYTES // 4], line[MAX_SENTENCE_BYTES // 4 :]
                    if piece.strip():
                        yield piece


def train_tokenizer(
    inputs: Sequence[str],
    out_dir: str | Path,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    sample_fraction: float = 1.0,
    seed: int = 0,
    num_threads: int = 8,
    read: ReadOptions | None = None,
    hf_split: str = "train",
    allow_empty_inputs: bool = False,
    soft_vocab_limit: bool = False,
    overwrite: bool = False,
    kind: str = "sentencepiece",
) -> Tokenizer:
    """Writes tokenizer.model, tokenizer.vocab (kind "sentencepiece") or tokenizer.json,
    tokenizer_config.json, special_tokens_map.json (kind "hf-bpe"), then tokenizer_info.json
    (last) into out_dir."""
    read = read or ReadOptions()
    if kind not in KINDS:
        raise DataError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "hf-bpe" and model_type != "bpe":
        raise DataError(f"kind hf-bpe trains a BPE; model_type {model_type!r} is for kind sentencepiece")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type must be bpe or unigram, got {model_type!r}")
    if not 0.0 < sample_fraction <= 1.0:
        raise DataError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine, other = (HF_FILE, MODEL_FILE) if kind == "hf-bpe" else (MODEL_FILE, HF_FILE)
    if (out / other).exists():  # a folder holding both loads as the sentencepiece one: never mix them
        raise OutputExistsError(f"{out / other} (a tokenizer of another kind) is in the output folder; choose another --out")
    if (out / mine).exists() and not overwrite:
        raise OutputExistsError(f"{out / mine} already exists; pass --overwrite to replace it")
    settings = {
        "vocab_size": vocab_size, "model_type": model_type, "character_coverage": character_coverage,
        "max_sentences": max_sentences, "sample_fraction": sample_fraction, "seed": seed, "num_threads": num_threads,
        "text_field": read.text_field, "txt_mode": read.txt_mode, "skip_bad_lines": read.skip_bad_lines,
        "soft_vocab_limit": soft_vocab_limit,
    }
    if kind == "hf-bpe":
        return _train_hf_bpe(inputs, out, settings, read, hf_split, allow_empty_inputs)
    import sentencepiece as spm

    stats = ReadStats()
    t0 = time.time()
    spm.set_random_generator_seed(seed)
    failure: list[DataError] = []
    model = io.BytesIO()  # not model_prefix: the proto would record a (temp) path, breaking determinism
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(inputs, read, stats, sample_fraction, seed, hf_split, allow_empty_inputs, failure),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
            num_threads=num_threads,
            hard_vocab_limit=not soft_vocab_limit,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high" on a small corpus
        if failure:
            raise failure[0] from None
        msg = str(e)
        hint = (" (this tool's flags: raise --vocab-size, or lower --character-coverage)" if "required_chars" in msg
                else " (lower --vocab-size, or pass --soft-vocab-limit)" if "Vocabulary size" in msg else "")
        raise DataError(f"sentencepiece training failed: {e}{hint}") from None
    if failure:
        raise failure[0]
    if stats.documents == 0:
        raise DataError(f"no documents found in {list(inputs)}")
    with atomic_open(out / MODEL_FILE, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with atomic_open(out / VOCAB_FILE, "w") as f:  # piece<TAB>score, one line per id ("\n" written escaped)
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i).replace(chr(10), chr(92) + 'n')}\t{sp.get_score(i):g}\n")
    tok = SentencePieceTokenizer(out / MODEL_FILE)
    info = {
        "format": "megamor-tokenizer",
        "content_hash": file_sha256(out / MODEL_FILE),
        "ids": {"unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "newline": tok.sp.piece_to_id("\n")},
        "settings": settings,
        "fixed_settings": {"byte_fallback": True, "normalization": "identity", "remove_extra_whitespaces": False,
                           "split_digits": True, "user_defined_symbols": ["\\n"]},
        "inputs": [i if i.startswith("hf:") else str(Path(i).resolve()) for i in inputs],
        "read_stats": stats.to_dict(),
        "seconds": round(time.time() - t0, 2),
    }
    write_json(out / INFO_FILE, info)
    fsync_path(out)
    return tok


def _train_hf_bpe(inputs: Sequence[str], out: Path, settings: dict, read: ReadOptions, hf_split: str,
                  allow_empty: bool) -> Tokenizer:
    from tokenizers import AddedToken, decoders, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    # Byte level: every string round-trips without byte fallback, and no id is ever <unk>.
    settings = {k: v for k, v in settings.items() if k not in ("model_type", "character_coverage", "max_sentences", "num_threads")}
    tok = RustTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings["vocab_size"], min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(p, special=True, normalized=False) for p in SPECIAL_PIECES],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stats = ReadStats()
    t0 = time.time()
    failure: list[DataError] = []
    tok.train_from_iterator(_sentences(inputs, read, stats, settings["sample_fraction"], settings["seed"], hf_split,
                                       allow_empty, failure), trainer=trainer)
    if failure:
        raise failure[0]
    if stats.documents == 0:
        raise DataError(f"no documents found in {list(inputs)}")
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < settings["vocab_size"] and not settings["soft_vocab_limit"]:
        raise DataError(f"the corpus yields only {n} of the {settings['vocab_size']} tokens asked "
                        "(lower --vocab-size, or pass --soft-vocab-limit)")
    with atomic_open(out / HF_FILE, "w") as f:
        f.write(tok.to_str(pretty=True))
    names = dict(zip(("unk_token", "bos_token", "eos_token", "pad_token"), SPECIAL_PIECES))
    write_json(out / "special_tokens_map.json", names)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers' built-in class over tokenizer.json
        **names,
        "add_bos_token": False,  # as megamor's encode: the pipeline appends EOS per document itself
        "add_eos_token": False,
        "split_special_tokens": True,  # "</s>" in text is text, as in megamor's encode
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    })
    loaded = load_tokenizer(out / HF_FILE)
    write_json(out / INFO_FILE, {
        "format": "megamor-tokenizer",
        "kind": "hf-bpe",
        "content_hash": loaded.content_hash,
        "ids": {"unk": loaded.unk_id, "bos": loaded.bos_id, "eos": loaded.eos_id, "pad": loaded.pad_id},
        "settings": settings,
        "fixed_settings": {"byte_level": True, "split_digits": True, "min_frequency": 2},
        "inputs": [i if i.startswith("hf:") else str(Path(i).resolve()) for i in inputs],
        "read_stats": stats.to_dict(),
        "seconds": round(time.time() - t0, 2),
    })
    fsync_path(out)
    return loaded
