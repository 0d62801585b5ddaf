"""Tokenizer files for an export folder, so `AutoTokenizer.from_pretrained(DIR)` loads the
run's tokenizer without remote code and encodes text to megamor's ids (`export_tokenizer`).

A Hugging Face tokenizer is copied as it is (tokenizer.json and its configs; a minimal
tokenizer_config.json naming its special tokens is written when it had none). For a
sentencepiece model the rest of this module makes the Hugging Face files:

Written: `tokenizer.json` (a `tokenizers` pipeline equivalent to the sentencepiece model) and
`tokenizer_config.json` naming transformers' built-in `PreTrainedTokenizerFast`, with the
model's unk/bos/eos/pad pieces and no BOS/EOS added by `encode` (megamor's encode adds none).

Why not just `LlamaTokenizer` over tokenizer.model: transformers rebuilds it with a Metaspace
pre-tokenizer that adds the "▁" dummy prefix only when the text does not already start with a
space, and makes user-defined pieces ("\\n") split the text; sentencepiece always adds the
prefix once. So the pipeline here is: normalizer Prepend("▁") + Replace(" ", "▁") (what
sentencepiece's identity normaliser with add_dummy_prefix does), no pre-tokenizer, the BPE or
Unigram model over the sentencepiece pieces with byte fallback, and the matching decoder.
The files are written only after they encode a sample text to the same ids as sentencepiece.
One known difference, Unigram models only: text holding a control piece literally ("<s>",
"</s>", "<pad>") encodes to that piece here (tokenizers' Unigram lattice cannot exclude it),
to its characters in sentencepiece. BPE models (megamor's default) match on it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megamor.data.tokenizer import Tokenizer, copy_tokenizer
from megamor.utils.atomic import write_json

# A sample the HF pipeline must encode exactly as sentencepiece before its files are written:
# leading/double spaces, newlines, digits, non-ASCII and characters the vocabulary may lack.
SAMPLE = (" Leading space, two  spaces,\nnew lines\n\n and digits 12345.\tTab; naïve café ☃ 日本語 🦀 "
          "The quick brown fox jumps over the lazy dog. ")


class TokenizerFilesError(RuntimeError):
    """The sentencepiece model cannot be expressed as a `tokenizers` pipeline here (why in the message)."""


def _model_proto(model_file: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def _bpe_merges(pieces: list[str], vocab: dict[str, int], merged_ids: list[int]) -> list[tuple[str, str]]:
    """BPE merges in priority order: sentencepiece merges the pair whose result has the best
    score (lowest id), so each mergeable piece contributes its splits into two known pieces,
    ordered by the piece's id, then by the ids of its parts."""
    merges = []
    for i in merged_ids:
        p = pieces[i]
        splits = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
        merges.extend(sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]])))
    return merges


def build_tokenizer(model_file: str | Path):
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece model (BPE or Unigram)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    model_file = Path(model_file)
    proto = _model_proto(model_file)
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise TokenizerFilesError(f"normaliser {norm.name!r} (remove_extra_whitespaces={norm.remove_extra_whitespaces}) "
                                  "has no tokenizers equivalent here; megamor's tokenizers use 'identity'")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    kind = proto.trainer_spec.model_type  # 1 unigram, 2 bpe
    unk = sp.unk_id()
    if kind == 2:
        vocab = {p: i for i, p in enumerate(pieces)}
        mergeable = [i for i in range(n) if i not in special and not sp.is_byte(i) and len(pieces[i]) > 1]
        model = BPE(vocab=vocab, merges=_bpe_merges(pieces, vocab, mergeable), unk_token=pieces[unk] if unk >= 0 else None,
                    fuse_unk=True, byte_fallback=True)
    elif kind == 1:
        model = Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=unk if unk >= 0 else None, byte_fallback=True)
    else:
        raise TokenizerFilesError(f"sentencepiece model type {kind} (only BPE and Unigram map onto tokenizers)")
    tok = Tokenizer(model)
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    # Control pieces are special tokens (never produced from text: split_special_tokens below).
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    return tok, sp


def _piece(sp, i: int) -> str | None:
    return sp.id_to_piece(i) if i >= 0 else None


def write_tokenizer_files(out_dir: str | Path, model_file: str | Path, model_max_length: int | None = None) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir` (beside tokenizer.model).
    Raises TokenizerFilesError (nothing written) when the pipeline would encode differently."""
    out = Path(out_dir)
    tok, sp = build_tokenizer(model_file)
    want, got = sp.encode(SAMPLE), tok.encode(SAMPLE, add_special_tokens=False).ids
    if want != got:
        raise TokenizerFilesError(f"{model_file}: the tokenizers pipeline encodes a sample differently from sentencepiece")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": _piece(sp, sp.unk_id()),
        "bos_token": _piece(sp, sp.bos_id()),
        "eos_token": _piece(sp, sp.eos_id()),
        "pad_token": _piece(sp, sp.pad_id()) or _piece(sp, sp.eos_id()),
        "add_bos_token": False,  # as megamor's encode: evaluation adds the EOS document prefix itself
        "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" in text is text, as in sentencepiece
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
    }
    tmp = out / ".tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out / "tokenizer.json")
    write_json(out / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    return [out / "tokenizer.json", out / "tokenizer_config.json"]


def export_tokenizer(out_dir: str | Path, tok: Tokenizer, model_max_length: int | None = None) -> list[Path]:
    """Copy `tok` into an export folder with the files AutoTokenizer needs. A sentencepiece
    model's tokenizer.model is copied first, so it is there even when its tokenizer.json cannot
    be made (ImportError, TokenizerFilesError)."""
    out = Path(out_dir)
    if tok.kind == "sentencepiece":
        import shutil

        from megamor.utils.atomic import temp_path

        tmp = temp_path(out / "tokenizer.model")
        shutil.copy2(tok.path, tmp)
        tmp.replace(out / "tokenizer.model")
        return [out / "tokenizer.model", *write_tokenizer_files(out, out / "tokenizer.model", model_max_length)]
    main = copy_tokenizer(tok, out)
    config = out / "tokenizer_config.json"
    if not config.is_file():
        names = getattr(tok, "names", {})
        write_json(config, {"tokenizer_class": "PreTrainedTokenizerFast",
                            **{f"{r}_token": n for r, n in names.items() if n is not None},
                            "split_special_tokens": True, "clean_up_tokenization_spaces": False,
                            "model_max_length": model_max_length or 1_000_000_000})
    return [main, config]
