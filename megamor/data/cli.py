"""Shared argument parsing for the data_prep entry points, and clean error exits."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from megamor.cli import EXIT_BAD_INPUT, fail, tool_name
from megamor.config import ConfigError
from megamor.data.errors import DataError
from megamor.data.readers import ReadOptions
from megamor.data.sources import TXT_MODES


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="files (.txt, .jsonl[.gz|.zst], .parquet), folders of them, a folder "
                   "saved with datasets' save_to_disk, or hf:NAME[:CONFIG] (needs the hub)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet/HF field holding the text (dotted path ok)")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="paragraph",
                   help="a .txt document is the whole file, a blank-line-separated paragraph, or a line")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) jsonl lines that are not JSON or lack the field, instead of failing")
    p.add_argument("--allow-empty-inputs", action="store_true", help="skip empty input files instead of failing")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset input")


def read_options(a: argparse.Namespace) -> ReadOptions:
    return ReadOptions(text_field=a.text_field, txt_mode=a.txt_mode, skip_bad_lines=a.skip_bad_lines)


def main_guard(fn: Callable[[], int | None], code: int = EXIT_BAD_INPUT) -> None:
    """Run an entry point; known input problems print one `tool: error:` line (no traceback) and
    exit `code` (2, bad input; verify_shards passes 1: a shard it was asked to check is bad)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    try:
        sys.exit(fn() or 0)
    except (DataError, ConfigError, FileNotFoundError) as e:
        fail(tool_name(), e, code)
    except KeyboardInterrupt:
        print(f"{tool_name()}: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
