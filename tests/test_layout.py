"""The code stays the size a reader can hold, and the prose names code that exists: each titan/parallel/ axis file
<= 200 lines, titan/train.py <= 450, no function in titan/ over 60 lines; every `path.py` and `path.py:name` in
README.md and docs/*.md names a real file, and a name defined in it (a def, class or assignment at the top of the
module or in a class; a name only imported there does not count). Also: no parameter in titan/ or scripts/ shadows a
builtin, and no script imports a private (`_name`) of the package. One process, no torch: about a second."""

from __future__ import annotations

import ast
import builtins
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCE_DIRS = ("titan", "scripts", "tests")
EXTERNAL = {"convert_llama_weights_to_hf.py"}  # transformers' script, named as the reference of a permutation
# A path ending in .py (not .pyi, not a URL's host like download.pytorch.org), optionally :name or :Class.name.
REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)(?![\w])(?::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?))?")

MAX_LINES = {"titan/train.py": 450, **{str(p.relative_to(REPO)): 200 for p in (REPO / "titan/parallel").glob("*.py")}}
MAX_FUNCTION_LINES = 60
TITAN_MODULE_NAMES = {p.stem for p in (REPO / "titan").rglob("*.py")} - {"__init__"}  # `hf._x` and the like


def titan_files() -> list[Path]:
    return sorted((REPO / "titan").rglob("*.py"))


@pytest.mark.parametrize("path", sorted(MAX_LINES))
def test_file_sizes(path):
    n = len((REPO / path).read_text().splitlines())
    assert n <= MAX_LINES[path], f"{path} has {n} lines (at most {MAX_LINES[path]}): move a cohesive piece out"


def test_no_function_in_titan_is_over_60_lines():
    long = []
    for path in titan_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # from `def` to the last line of the body
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_no_parameter_shadows_a_builtin():
    shadowing = []
    for path in python_files("titan", "scripts"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
                shadowing += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n in vars(builtins)]
    assert not shadowing, f"parameters named like builtins: {shadowing}"


def test_scripts_import_no_private_name_of_titan():
    private = []
    for path in python_files("scripts"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "titan":
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in TITAN_MODULE_NAMES:
                private.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not private, f"scripts reach into titan's private names: {private}"


@cache
def defined_names(path: Path) -> dict[str, set[str]]:
    """{top-level name: names defined in its class body (empty for functions and variables)}."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            names[node.name] |= {t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                                 if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    names[t.id] = set()
    return names


@cache
def by_basename() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for folder in SOURCE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            found.setdefault(path.name, []).append(path)
    return found


def resolve(ref: str) -> list[Path]:
    """The files a reference may mean: the path from the repository root, or, for a bare file name (tables and
    lists that name the folder once), every file of that name."""
    if "/" in ref:
        path = REPO / ref
        return [path] if path.is_file() else []
    return by_basename().get(ref, [])


def reference_problems(text: str, where: str) -> list[str]:
    problems = []
    for match in REFERENCE.finditer(text):
        ref, name = match.groups()
        if ref in EXTERNAL:
            continue
        files = resolve(ref)
        if not files:
            problems.append(f"{where}: {ref} does not exist")
            continue
        if name is None:
            continue
        top, _, member = name.partition(".")
        if not any(top in defined_names(f) and (not member or member in defined_names(f)[top]) for f in files):
            problems.append(f"{where}: {ref}:{name} is not defined there")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_references_in_docs_exist(doc):
    problems = []
    for i, line in enumerate(doc.read_text().splitlines(), 1):
        problems += reference_problems(line, f"{doc.relative_to(REPO)}:{i}")
    assert not problems, "\n".join(problems)


def test_the_reference_check_catches_stale_names():
    """The checker itself: a renamed function, a moved file and an imported-only name are each reported."""
    assert reference_problems("`titan/train.py:train_steps`, `tensor_parallel.py:apply_tp`", "x") == []
    assert reference_problems("`titan/parallel/mesh.py:ParallelDims.from_config`", "x") == []
    assert len(reference_problems("`titan/train.py:no_such_function`", "x")) == 1
    assert len(reference_problems("`titan/no_such_module.py`", "x")) == 1
    assert len(reference_problems("`titan/parallel/mesh.py:ParallelDims.no_such_method`", "x")) == 1
    assert len(reference_problems("`titan/models/llama.py:Transformer`", "x")) == 1  # imported there, not defined
    assert reference_problems("https://download.pytorch.org/whl/nightly/cpu", "x") == []
