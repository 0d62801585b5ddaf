"""Lazy package exports (megamor.utils.lazy) on a package written here: a name loads its
submodule on first use only, unknown names raise AttributeError, and an export named like its
submodule stays the export after the submodule is imported."""

from __future__ import annotations

import importlib
import sys

import pytest

INIT = """
from megamor.utils.lazy import keep_exports_over_submodules, lazy_exports
_WHERE = {"tool": "tool", "VALUE": "heavy"}
__getattr__ = lazy_exports(__name__, _WHERE)
keep_exports_over_submodules(__name__, _WHERE)
"""


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    root = tmp_path / "lazypkg"
    root.mkdir()
    (root / "__init__.py").write_text(INIT)
    (root / "heavy.py").write_text("VALUE = 42\n")
    (root / "tool.py").write_text("def tool():\n    return 'the function'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("lazypkg")
    for name in [m for m in sys.modules if m == "lazypkg" or m.startswith("lazypkg.")]:
        del sys.modules[name]


def test_a_name_loads_its_submodule_on_first_use_only(pkg):
    assert "lazypkg.heavy" not in sys.modules
    assert pkg.VALUE == 42 and "lazypkg.heavy" in sys.modules
    assert "VALUE" in vars(pkg)  # bound: the next lookup does not go through __getattr__


def test_an_unknown_name_is_an_attribute_error(pkg):
    with pytest.raises(AttributeError, match="'lazypkg' has no attribute 'nope'"):
        pkg.nope  # noqa: B018


def test_an_export_named_like_its_submodule_stays_the_export(pkg):
    importlib.import_module("lazypkg.tool")  # binds the submodule on the package, unless kept out
    assert callable(pkg.tool) and pkg.tool() == "the function"
    from lazypkg import tool

    assert tool() == "the function"
