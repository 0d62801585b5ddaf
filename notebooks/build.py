"""Write each notebook from its percent-format source, outputs stripped:

    python notebooks/build.py [SOURCE ...]   # notebooks/NAME.py -> notebooks/NAME.ipynb (default: all)
    python notebooks/build.py --check        # exit 1 when a committed .ipynb differs from its source

A source is a Python file: a line `# %%` starts a code cell, `# %% [markdown]` a markdown cell
whose lines are `# ` comments; lines before the first marker are a header, not part of the
notebook. Cell ids are numbered, so the same source always gives the same bytes (clean diffs).
Bad input (an unknown cell kind, a markdown line that is not a comment): one line naming the
file and line, exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from megamor.utils.atomic import atomic_open

HERE = Path(__file__).resolve().parent
SOURCES = ("quickstart.py",)
_MARKER = re.compile(r"^# %%(?:\s+\[(\w+)\])?\s*$")


class SourceError(ValueError):
    """A malformed notebook source (bad input)."""


def parse(path: Path) -> list[tuple[str, str]]:
    """(cell kind, text) per cell of a percent-format source."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    cells: list[tuple[str, list[str]]] = []
    for n, line in enumerate(lines, 1):
        m = _MARKER.match(line)
        if m:
            kind = m.group(1) or "code"
            if kind not in ("code", "markdown"):
                raise SourceError(f"{path}:{n}: unknown cell kind [{kind}] (code or [markdown])")
            cells.append((kind, []))
        elif not cells:
            continue  # the header
        elif cells[-1][0] == "markdown" and line.strip():
            if not line.startswith("#"):
                raise SourceError(f"{path}:{n}: a markdown cell's lines must be '# ' comments")
            cells[-1][1].append(line[2:] if line.startswith("# ") else line[1:])
        else:
            cells[-1][1].append("" if cells[-1][0] == "markdown" else line)
    if not cells:
        raise SourceError(f"{path}:1: no cells (a cell starts with a '# %%' line)")
    return [(kind, "\n".join(body).strip("\n")) for kind, body in cells]


def to_notebook(cells: list[tuple[str, str]]) -> str:
    """The .ipynb text: no outputs, no execution counts, numbered cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
    nb.cells = [make[kind](text, id=f"cell-{i}") for i, (kind, text) in enumerate(cells)]
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def build(source: Path) -> tuple[Path, str]:
    return source.with_suffix(".ipynb"), to_notebook(parse(source))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python notebooks/build.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", type=Path, default=[HERE / name for name in SOURCES],
                   help="percent-format sources (default: the notebooks in notebooks/)")
    p.add_argument("--check", action="store_true", help="only check that every notebook matches its source")
    args = p.parse_args(argv)
    stale = []
    for source in args.sources:
        try:
            target, text = build(source)
        except SourceError as e:
            print(f"notebooks/build.py: {e}", file=sys.stderr)
            return 2
        if target.is_file() and target.read_text() == text:
            continue
        if args.check:
            stale.append(target)
        else:
            with atomic_open(target, "w") as f:
                f.write(text)
            print(f"wrote {target}")
    for target in stale:
        print(f"{target} differs from its source: run python notebooks/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
