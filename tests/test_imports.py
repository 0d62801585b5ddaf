"""The package's import structure: no import circles between modules or between subpackages,
the run-folder layer (megamor.runs) below training and evaluation, and the model below
everything that uses it.

The graph is built from the source with ast: every `import megamor...` / `from megamor...
import` of a module, at module level or inside a function (`if TYPE_CHECKING:` blocks
excluded unless asked for: they run under a type checker only, but they still say which
layer a module leans on). A circle held apart by a function-level import is still a circle:
the modules cannot be understood, or imported first, on their own.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import megamor

PKG = Path(megamor.__file__).parent
RUNS = "megamor.runs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, top_level_only: bool, type_checking: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of a module, `if TYPE_CHECKING:` blocks excluded unless
    type_checking; with top_level_only, only those run when the module is imported (not
    inside functions)."""
    out: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            todo += node.orelse
        elif top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        else:
            todo += list(ast.iter_child_nodes(node))
    return out


def imported_modules(name: str, path: Path, known: set[str], top_level_only: bool = False,
                     type_checking: bool = False) -> set[str]:
    """The megamor modules `name` imports at module level (a package import `from megamor.x
    import y` counts as megamor.x, plus megamor.x.y when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _imports(tree, top_level_only, type_checking):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
            for t in targets:
                if t.startswith("megamor"):
                    out.add(t)
            continue
        if node.level:  # relative import
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if not mod.startswith("megamor"):
            continue
        out.add(mod)
        for a in node.names:
            if f"{mod}.{a.name}" in known:
                out.add(f"{mod}.{a.name}")
    # Importing megamor.a.b runs megamor.a's __init__ first, unless the importer lives in
    # megamor.a itself (a package is always initialised before its submodules run).
    for m in list(out):
        parts = m.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if not (name == parent or name.startswith(parent + ".")):
                out.add(parent)
    return {m for m in out if m in known and m != name}


def import_graph(top_level_only: bool = False, type_checking: bool = False) -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imported_modules(name, path, known, top_level_only, type_checking) for name, path in mods.items()}


def package_of(module: str) -> str:
    """megamor.x.y -> megamor.x (a module directly under megamor is its own package)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Subpackage -> the subpackages its modules import (itself left out)."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        out.setdefault(package_of(mod), set())
        for d in deps:
            out.setdefault(package_of(d), set())
            if package_of(d) != package_of(mod):
                out[package_of(mod)].add(package_of(d))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a -> b -> ... -> a), or None. Iterative DFS with colours."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        colour[start] = grey
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = black
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if colour.get(nxt) == grey:
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_known_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph(top_level_only=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_cycle_counting_type_checking_imports():
    cycle = find_cycle(import_graph(type_checking=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_package_level_cycle():
    """No a -> b -> a between subpackages (megamor.train, megamor.parallel, ...): each layer
    can be read, and replaced, with only the layers below it."""
    assert package_graph({"megamor.a.x": {"megamor.b.y"}, "megamor.b.y": {"megamor.a.z"}, "megamor.a.z": set()}) == {
        "megamor.a": {"megamor.b"}, "megamor.b": {"megamor.a"}}
    cycle = find_cycle(package_graph(import_graph(type_checking=True)))
    assert cycle is None, "package circle: " + " -> ".join(cycle or [])


MODEL = "megamor.model"
ABOVE_MODEL = ("megamor.inference", "megamor.train", "megamor.eval", "megamor.parallel", "megamor.runs")


def test_model_imports_nothing_above_it():
    """megamor.model (layers, routing, caches) is the bottom of the stack: decoding, training,
    evaluation, parallelism and run folders are applied to it from outside."""
    graph = import_graph(type_checking=True)  # annotations too: no hidden way up
    mine = {m: deps for m, deps in graph.items() if m == MODEL or m.startswith(MODEL + ".")}
    assert f"{MODEL}.routing" in mine
    bad = {m: sorted(d for d in deps if d.startswith(ABOVE_MODEL)) for m, deps in mine.items()}
    assert not any(bad.values()), bad


def test_routing_policy_imports_only_torch():
    """The routing module ships as a standalone remote-code file beside an export's
    modeling_megamor.py: it may import torch and the standard library only."""
    import megamor.model.routing as routing

    tree = ast.parse(Path(routing.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else (node.module or "").split(".")[0])
    assert roots <= {"torch", "__future__"} | set(sys.stdlib_module_names), roots


def test_run_folder_package_imports_neither_train_nor_eval():
    graph = import_graph()  # function-level imports too: the layer never reaches up
    mine = {m: deps for m, deps in graph.items() if m == RUNS or m.startswith(RUNS + ".")}
    assert RUNS in mine and f"{RUNS}.load" in mine, f"{RUNS} is missing"
    bad = {m: sorted(d for d in deps if d.startswith(("megamor.train", "megamor.eval"))) for m, deps in mine.items()}
    assert not any(bad.values()), bad
    allowed = ("megamor.runs", "megamor.model", "megamor.parallel", "megamor.data", "megamor.config", "megamor.env",
               "megamor.cli", "megamor.utils")
    outside = {m: sorted(d for d in deps if not d.startswith(allowed)) for m, deps in mine.items()}
    assert not any(outside.values()), outside


def test_utils_import_no_other_megamor_package():
    """megamor.utils (atomic writes) sits below every package: the nine that write files lean on
    it, so it may lean on none of them."""
    graph = import_graph(type_checking=True)
    mine = {m: deps for m, deps in graph.items() if m.startswith("megamor.utils")}
    assert "megamor.utils.atomic" in mine
    bad = {m: sorted(d for d in deps if not d.startswith("megamor.utils")) for m, deps in mine.items()}
    assert not any(bad.values()), bad


def test_parallel_imports_nothing_from_train():
    """megamor.parallel (process groups, TP/SP layers) is applied to the model by the trainer,
    never the other way: parallel -> train would make the two one layer."""
    graph = import_graph(type_checking=True)
    bad = {m: sorted(d for d in deps if d.startswith("megamor.train"))
           for m, deps in graph.items() if m.startswith("megamor.parallel")}
    assert not any(bad.values()), bad


FIRST_IMPORTED = [RUNS, "megamor.runs.load", "megamor.runs.resume", "megamor.train.trainer", "megamor.train.preflight",
                  "megamor.runs.find", "megamor.model.mor", "megamor.inference.generate", "megamor.model.routing",
                  "megamor.train.config", "megamor.train.schedule", "megamor.train.schedule_change",
                  "megamor.train.init_from"]

# One interpreter imports the third-party libraries once (megamor's circles are among megamor's
# own modules, so they need not be fresh), then forks a child per module that imports it first.
_FORK_EACH = r"""
import importlib, json, os, sys, traceback
for lib in ("numpy", "yaml", "omegaconf", "torch", "torch._dynamo", "deepspeed", "transformers", "sentencepiece", "tokenizers"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "megamor" or m.startswith("megamor.")], "a library imported megamor"
out = {}
for module in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            code, msg = 0, ""
        except BaseException:
            code, msg = 1, traceback.format_exc()
        os.write(w, msg.encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    out[module] = {"rc": os.waitstatus_to_exitcode(status), "err": msg}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def first_imports() -> dict[str, dict]:
    import json

    # the names travel as one JSON word: a module name alone on the command line reads as a launch
    r = subprocess.run([sys.executable, "-c", _FORK_EACH, json.dumps(FIRST_IMPORTED)], capture_output=True, text=True,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", FIRST_IMPORTED)
def test_each_module_imports_first_in_a_fresh_interpreter(module, first_imports):
    """Imported first, alone: a circle that import order hides elsewhere fails here."""
    got = first_imports[module]
    assert got["rc"] == 0, got["err"][-2000:]
