"""Train a sentencepiece tokenizer from the same inputs tokenize_and_shard reads.

Documents are fed to sentencepiece line by line ("\\n" is a user-defined piece, so lines never
need to contain it). For large corpora two knobs bound the cost: `sample_fraction` keeps a
seeded, content-hashed fraction of documents (unbiased across files, unlike "the first N MB"),
and `max_sentences` is sentencepiece's own reservoir sample (bounds memory).
Training is deterministic for a given (inputs, settings, seed, num_threads); sentencepiece's
result depends on the thread count, which is therefore a fixed setting, not the core count.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from megamor.data.atomic import atomic_open, fsync_path, write_json
from megamor.data.errors import DataError, OutputExistsError
from megamor.data.readers import ReadOptions, ReadStats, iter_documents
from megamor.data.sources import plan_units, resolve_sources
from megamor.data.tokenizer import (
    INFO_FILE,
    MODEL_FILE,
    VOCAB_FILE,
    Tokenizer,
    file_sha256,
)

UNK, BOS, EOS, PAD = 0, 1, 2, 3
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
) -> Tokenizer:
    """Writes tokenizer.model, tokenizer.vocab and tokenizer_info.json (last) into out_dir."""
    import sentencepiece as spm

    read = read or ReadOptions()

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type must be bpe or unigram, got {model_type!r}")
    if not 0.0 < sample_fraction <= 1.0:
        raise DataError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MODEL_FILE).exists() and not overwrite:
        raise OutputExistsError(f"{out / MODEL_FILE} already exists; pass --overwrite to replace it")
    settings = {
        "vocab_size": vocab_size, "model_type": model_type, "character_coverage": character_coverage,
        "max_sentences": max_sentences, "sample_fraction": sample_fraction, "seed": seed, "num_threads": num_threads,
        "text_field": read.text_field, "txt_mode": read.txt_mode, "skip_bad_lines": read.skip_bad_lines,
        "soft_vocab_limit": soft_vocab_limit,
    }
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
        hint = " (lower --vocab-size, or pass --soft-vocab-limit)" if "Vocabulary size" in str(e) else ""
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
    tok = Tokenizer(out / MODEL_FILE)
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
