"""The usage comments of launch/*.sh and slurm/*.sbatch name files and modules that exist."""

from __future__ import annotations

import importlib.util
import re

import pytest

from megamor.env import repo_root

SCRIPTS = sorted([*repo_root().glob("launch/*.sh"), *repo_root().glob("slurm/*.sbatch")])
TOP = ("configs", "launch", "slurm", "evals", "data_prep", "megamor", "tests")
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(TOP)})/[\w./-]*\w)")
MODULE = re.compile(r"-m\s+(megamor(?:\.\w+)*)")


def comments(script) -> str:
    return "\n".join(line for line in script.read_text().splitlines()
                     if line.lstrip().startswith("#") and not line.startswith(("#!", "#SBATCH")))


def test_there_are_scripts_with_paths_to_check():
    assert len(SCRIPTS) >= 6 and sum(len(PATH.findall(comments(s))) for s in SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_usage_comments_name_real_files(script):
    text = comments(script)
    missing = [p for p in PATH.findall(text) if not (repo_root() / p).exists()]
    assert not missing, f"{script.name} names files that do not exist: {missing}"
    modules = [m for m in MODULE.findall(text) if importlib.util.find_spec(m) is None]
    assert not modules, f"{script.name} names modules that do not exist: {modules}"
