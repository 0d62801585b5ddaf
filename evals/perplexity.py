#!/usr/bin/env python
"""Perplexity of raw text files or validation token shards.

    python evals/perplexity.py --checkpoint run/ --tokenizer tok.model \
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --split wikitext            # disjoint windows
    python evals/perplexity.py --checkpoint run/ --text file.txt --stride 512         # sliding windows
    python evals/perplexity.py --checkpoint run/ --shards data/shards               # valid-NNNNN.npy token shards

Reports token NLL/perplexity, bits per byte, byte and word perplexity (JSON). The context
defaults to the model's max_seq_len. Bad input (an empty or undecodable file, a missing
checkpoint, a tokenizer or shards other than the ones the checkpoint was trained with) prints
one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse

from megamor.cli import ArgumentParser, positive_int
from megamor.eval.cli import add_model_args, build_scorer, run_main, set_threads, write_json
from megamor.eval.text_input import ENCODING_ERRORS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help=".txt (optionally .bz2/.gz/.xz) or .jsonl files")
    src.add_argument("--shards", nargs="+", help="token shard files (.npy), or folders of <split>-NNNNN.npy shards")
    p.add_argument("--split", default="file", choices=["file", "wikitext", "blank"], help="documents in a .txt: whole file, WikiText articles, blank-line blocks")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl files")
    p.add_argument("--encoding", default="utf-8", help="encoding of the --text files")
    p.add_argument("--encoding-errors", default="strict", choices=ENCODING_ERRORS,
                   help="bytes that do not decode: an error naming the file and byte offset (strict), or replaced/dropped")
    p.add_argument("--shard-split", default="valid", help="shard name prefix inside a shard folder (tokenize_and_shard writes valid-NNNNN.npy)")
    p.add_argument("--stride", type=positive_int, default=None, help="tokens each window advances (default: max length, i.e. disjoint windows)")
    p.add_argument("--max-docs", type=positive_int, default=None, help="only the first N documents")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="only the first N shard tokens")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if args.text and args.max_tokens is not None:  # cutting a text would skew its bytes and words
        p.error("--max-tokens applies to --shards only: limit --text with --max-docs")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from megamor.eval.perplexity import load_shard_tokens, perplexity_of_texts, perplexity_of_tokens, read_texts

    set_threads()
    if args.text:  # read (and check) the text before loading a model
        docs = read_texts(args.text, split=args.split, text_key=args.text_key, encoding=args.encoding,
                          errors=args.encoding_errors)[: args.max_docs]
    scorer, tok, meta = build_scorer(args, shards=args.shards or ())
    if args.text:
        res = perplexity_of_texts(scorer, tok, docs, stride=args.stride)
    else:
        tokens = load_shard_tokens(args.shards, split=args.shard_split)[: args.max_tokens]
        res = perplexity_of_tokens(scorer, tokens, tok.eos_id, stride=args.stride, tok=tok)
    payload = {"perplexity": res.to_dict(), "source": args.text or args.shards, "checkpoint": str(args.checkpoint), "meta": meta}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    run_main(main)
