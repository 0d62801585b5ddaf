"""What every command-line entry point shares: one-line errors that start with the tool's name,
the documented exit codes, and output that stays machine-readable when redirected.

Exit codes (all tools): 0 done, 1 failed (a bug or an environment fault: the traceback is kept),
2 bad input (an argument, a config key, a file: one line naming it, nothing started).
`megamor.train` adds 75 (stopped by a signal after a complete checkpoint; see train/signals.py).

Imports nothing heavy: an argument error must answer before torch or DeepSpeed load.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """Input the user can fix (an argument, a file, a mismatch): one line, exit 2."""


def tool_name(prog: str | None = None) -> str:
    """`megamor.train` for `python -m megamor.train`, `fewshot.py` for a script."""
    prog = prog or Path(sys.argv[0]).name
    return prog.removeprefix("python -m ").strip()


def fail(tool: str, message: str | BaseException, code: int = EXIT_BAD_INPUT, label: str = "error") -> NoReturn:
    """Print `tool: label: message` as one line on stderr (a line per mistake for several
    config errors) and exit with `code`."""
    report(tool, message, label)
    raise SystemExit(code)


def report(tool: str, message: str | BaseException, label: str = "error") -> None:
    from megamor.config import error_lines

    if isinstance(message, BaseException):
        lines = error_lines(message) if hasattr(message, "errors") else [one_line(_describe(message))]
    else:
        lines = [one_line(message)]
    for line in lines:
        print(f"{tool}: {label}: {line}", file=sys.stderr, flush=True)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first), exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(tool_name(self.prog), f"{message} (see --help)")


def bad_input_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input in every tool (light modules only)."""
    from megamor.config import ConfigError

    return (BadInput, ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def run_main(main: Callable[[], Any], tool: str | None = None,
             bad_input: tuple[type[BaseException], ...] = ()) -> None:
    """Run an entry point: bad input (see bad_input_types, plus `bad_input`) prints one
    `tool: error:` line and exits 2; anything else keeps its traceback (exit 1)."""
    name = tool or tool_name()
    try:
        rc = main()
    except bad_input_types() + bad_input as e:
        fail(name, e)
    except KeyboardInterrupt:
        fail(name, "interrupted", EXIT_FAILED)
    raise SystemExit(rc if isinstance(rc, int) else EXIT_OK)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def use_colour(stream: Any = None) -> bool:
    """ANSI colours only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")
