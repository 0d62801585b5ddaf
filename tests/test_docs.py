"""The README stays a front door and the docs stay connected: README.md is short, every relative
link in README.md and docs/*.md reaches an existing file (and, for `#anchor` links into
markdown, an existing heading), and every docs page is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path

from megamor.env import repo_root

README_MAX_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (a `# comment` or `[a](b)` in code is no heading or link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(md: Path) -> list[str]:
    return LINK.findall(_prose(md.read_text(encoding="utf-8")))


def broken_links(md: Path) -> list[str]:
    """`file: target (why)` for each relative link of `md` that leads nowhere."""
    bad = []
    for target in links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = md if not path else (md.parent / path).resolve()
        if not dest.exists():
            bad.append(f"{md.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{md.name}: {target} (no heading with that anchor)")
    return bad


def _pages() -> list[Path]:
    return [repo_root() / "README.md", *sorted((repo_root() / "docs").glob("*.md"))]


def test_readme_is_short():
    n = len((repo_root() / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move sections to docs/"


def test_every_relative_link_resolves():
    bad = [b for md in _pages() for b in broken_links(md)]
    assert not bad, "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(repo_root() / t.partition("#")[0]).resolve() for t in links(repo_root() / "README.md")}
    missing = [p.name for p in sorted((repo_root() / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "b.md").write_text("# Fast decoding: the engine\n\n```bash\n# not a heading\n```\n")
    a = tmp_path / "a.md"
    a.write_text("[ok](b.md#fast-decoding-the-engine) [gone](c.md) [bad](b.md#not-a-heading) "
                 "[web](https://example.org/x) `[code](nowhere.md)`\n\n## Local\n[self](#local) [miss](#nope)\n")
    assert broken_links(a) == ["a.md: c.md (no such file)", "a.md: b.md#not-a-heading (no heading with that anchor)",
                               "a.md: #nope (no heading with that anchor)"]
    assert anchors("## A, b: `c`\n## A, b: `c`\n") == {"a-b-c", "a-b-c-1"}


def _runs(module: str) -> bool:
    """Whether `python -m module` does something: a package with __main__.py or a module with a main block."""
    path = repo_root() / Path(*module.split("."))
    if (path / "__main__.py").is_file():
        return True
    file = path.with_suffix(".py")
    return file.is_file() and 'if __name__ == "__main__":' in file.read_text(encoding="utf-8")


def test_documented_commands_exist():
    """`python -m megamor.X` names a runnable module (one without a main block prints nothing and
    exits 0) and `python path.py` an existing script."""
    bad = []
    for md in _pages():
        text = md.read_text(encoding="utf-8")
        bad += [f"{md.name}: python -m {m}" for m in re.findall(r"python -m (megamor(?:\.\w+)+)", text)
                if m != "megamor.X" and not _runs(m)]
        bad += [f"{md.name}: python {s}" for s in re.findall(r"python ((?:[\w-]+/)*[\w-]+\.py)\b", text)
                if not (repo_root() / s).is_file()]
    assert not bad, "\n".join(bad)
