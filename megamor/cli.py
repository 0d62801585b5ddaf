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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """Input the user can fix (an argument, a file, a mismatch): one line, exit 2."""


def tool_name(prog: str | None = None) -> str:
    """`megamor.train` for `python -m megamor.train`, `fewshot.py` for a script."""
    prog = (prog or Path(sys.argv[0]).name).removeprefix("python -m ").removeprefix("python ").strip()
    return Path(prog).name if "/" in prog else prog


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


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count, a length, a limit)."""
    return _int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    """An argparse type: an integer >= 0 (0 meaning none, e.g. zero-shot)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first), exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(tool_name(self.prog), f"{message} (see --help)")


def pairs(items: list[str], flag: str, what: str = "NAME=VALUE") -> dict[str, str]:
    """`NAME=VALUE` arguments of a repeatable flag as a dict; BadInput naming the flag otherwise."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise BadInput(f"{flag} {item!r}: expected {what}")
        out[name.strip()] = value.strip()
    return out


def one_line_errors_everywhere(tool: str) -> None:
    """Give parsers this process builds with plain argparse (a library's own command line, e.g.
    lm-eval's or DeepSpeed's) the same one-line error and exit 2, named after `tool`."""

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        fail(tool, f"{message} (see --help)")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign, assignment]


def bad_input_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input in every tool (light modules only)."""
    from megamor.config import ConfigError

    return (BadInput, ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def run_main(main: Callable[[], Any], tool: str | None = None,
             bad_input: tuple[type[BaseException], ...] = (), results_on_stdout: bool = True) -> None:
    """Run an entry point: bad input (see bad_input_types, plus `bad_input`) prints one
    `tool: error:` line and exits 2; anything else keeps its traceback (exit 1).
    results_on_stdout: only what the tool writes to `results()` reaches stdout; everything
    else printed there (DeepSpeed's and other libraries' lines) goes to stderr."""
    name = tool or tool_name()
    try:
        if results_on_stdout:
            with stdout_for_results():
                rc = main()
        else:
            rc = main()
    except bad_input_types() + bad_input as e:
        fail(name, e)
    except KeyboardInterrupt:
        fail(name, "interrupted", EXIT_FAILED)
    raise SystemExit(rc if isinstance(rc, int) else EXIT_OK)


_results: Any = None


def results() -> Any:
    """The stream for a tool's results (its JSON, its table): the real stdout."""
    return _results if _results is not None else sys.stdout


@contextmanager
def stdout_for_results() -> Iterator[Any]:
    """Point file descriptor 1 at stderr, so any library's output (Python or C) lands there,
    and keep the real stdout as `results()`: `tool ... > out.json` holds only the results."""
    global _results
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _results = os.fdopen(saved, "w", encoding="utf-8")
    try:
        yield _results
    finally:
        _results.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        _results.close()
        _results = None


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def use_colour(stream: Any = None) -> bool:
    """ANSI colours only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    stream = stream if stream is not None else results()
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")
