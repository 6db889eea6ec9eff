"""The import rules of ARCHITECTURE.md, checked on the source with `ast`: no circle between files, every
import goes to an allowed layer, spo_runtime never imports BentoML, Starlette or service/, route modules never
import each other, and no file of spo_runtime/ or service/ is over 500 lines. The checker is itself tested on
a small tree that breaks each rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300  # the aim is ~250; this catches a class growing back into a god object

# layer -> the layers it may import (its own included: circles are checked separately)
ALLOWED = {
    "leaf": {"leaf"},
    "core": {"leaf", "core"},
    "lora": {"leaf", "core", "lora"},
    "speed": {"leaf", "core", "speed"},
    "state": {"leaf", "core", "state"},
    "model": {"leaf", "core", "lora", "speed", "model"},
    "engine": {"leaf", "core", "engine"},  # drives a StepModel protocol, never spo_runtime.model
    "preference": {"leaf", "core", "model", "preference"},  # the SPM and scorers; the engine gets one injected
    "training": {"leaf", "core", "lora", "speed", "model", "preference", "training"},
    "api": {"leaf", "core", "lora", "speed", "state", "model", "engine", "preference", "training", "api"},
    "service.base": {"leaf", "core", "lora", "speed", "state", "model", "engine", "preference", "training", "api",
                     "service.base"},
    "service.routes": {"leaf", "core", "lora", "speed", "state", "model", "engine", "preference", "training", "api",
                       "service.base"},
    "service.app": {"leaf", "core", "lora", "speed", "state", "model", "engine", "preference", "training", "api",
                    "service.base", "service.routes", "service.app"},
}
LEAVES = {"errors", "fsutil", "faults", "metrics", "limits", "validation", "imaging", "version"}
CORE = {"settings", "requests"}
SUBPACKAGES = {"sampling": "core", "lora": "lora", "speed": "speed", "model": "model", "engine": "engine",
               "preference": "preference", "training": "training"}
SERVICE_ROUTES = {"stream", "admin", "train", "eval", "openai_api", "a1111", "ui"}
SERVICE_APP = {"app", "service"}
FORBIDDEN_IN_CORE = ("bentoml", "starlette", "service")


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "service":
        name = parts[1] if len(parts) > 1 else ""
        return "service.routes" if name in SERVICE_ROUTES else "service.app" if name in SERVICE_APP else "service.base"
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "api"
    if parts[1] in SUBPACKAGES:
        return SUBPACKAGES[parts[1]]
    if parts[1] in LEAVES:
        return "leaf"
    if parts[1] in CORE:
        return "core"
    if parts[1] == "state":
        return "state"
    raise AssertionError(f"{module}: not in any layer of ARCHITECTURE.md (add it to the table there and here)")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for package in ("spo_runtime", "service"):
        for f in sorted((root / package).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the file, at any depth (lazy imports count), except under
    `if TYPE_CHECKING:`. `from a.b import c` names a.b.c when that is a module, else a.b."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def check(root: Path) -> list[str]:
    """Every broken rule under `root`, one line each (empty: the tree keeps ARCHITECTURE.md)."""
    known = modules(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for m, path in known.items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_FILE_LINES:
            problems.append(f"{path.relative_to(root)}: {n} lines (at most {MAX_FILE_LINES})")
        for c in ast.walk(ast.parse(text)):
            if isinstance(c, ast.ClassDef) and c.end_lineno - c.lineno + 1 > MAX_CLASS_LINES:
                problems.append(f"{path.relative_to(root)}: class {c.name} has {c.end_lineno - c.lineno + 1} lines "
                                f"(at most {MAX_CLASS_LINES})")
        for name, line in imports(m, path, known):
            top = name.split(".")[0]
            where = f"{path.relative_to(root)}:{line}"
            if m.startswith("spo_runtime") and top in FORBIDDEN_IN_CORE:
                problems.append(f"{where}: spo_runtime imports {name} (the core never imports the service or its framework)")
                continue
            if top not in ("spo_runtime", "service"):
                continue
            if name not in known:
                problems.append(f"{where}: imports {name}, which is no module of the tree")
                continue
            if name == m:
                continue
            if m.startswith("spo_runtime") and name == "spo_runtime" and m != "spo_runtime.__main__":
                problems.append(f"{where}: imports the package spo_runtime (its __init__ imports the layers: import the module)")
            src, dst = layer(m), layer(name)
            if dst not in ALLOWED[src]:
                problems.append(f"{where}: {m} ({src}) imports {name} ({dst}); {src} may import only "
                                f"{', '.join(sorted(ALLOWED[src]))}")
            if src == dst == "service.routes":
                problems.append(f"{where}: route module {m} imports route module {name} (share through service.context)")
            graph[m].add(name)
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return list(dict.fromkeys(problems))  # an import repeated in two functions is one problem


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_path(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A circle through the component's first module (breadth-first back to it)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_tree_keeps_the_written_rules():
    problems = check(ROOT)
    assert not problems, "ARCHITECTURE.md's rules are broken:\n" + "\n".join(problems)


def test_architecture_md_names_every_subpackage_and_leaf():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for name in [*SUBPACKAGES, *LEAVES, *CORE, "state"]:
        assert f"`{name}" in text, f"ARCHITECTURE.md does not describe {name}"
    for name in SERVICE_ROUTES | SERVICE_APP | {"context", "door", "errors"}:
        if (ROOT / "service" / f"{name}.py").exists():
            assert f"`{name}" in text, f"ARCHITECTURE.md does not describe service/{name}.py"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


GOOD = {
    "spo_runtime/__init__.py": "from spo_runtime.engine import Engine\n",
    "spo_runtime/errors.py": "class SpoError(Exception): ...\n",
    "spo_runtime/requests.py": "from spo_runtime.errors import SpoError\n",
    "spo_runtime/engine/__init__.py": "from spo_runtime.engine.engine import Engine\n",
    "spo_runtime/engine/engine.py": "from spo_runtime.requests import SpoError\nclass Engine: ...\n",
    "spo_runtime/model/__init__.py": "",
    "spo_runtime/model/pipeline.py": "from spo_runtime import errors\n",
    "service/__init__.py": "",
    "service/context.py": "from spo_runtime.engine import Engine\n",
    "service/stream.py": "from service import context\n",
    "service/a1111.py": "from service.context import Engine\n",
    "service/app.py": "from service import a1111, stream\n",
}

PREFERENCE = {"spo_runtime/preference/__init__.py": "", "spo_runtime/preference/scorers.py": "X = 1\n"}


@pytest.mark.parametrize("change, expected", [
    ({}, None),
    ({"spo_runtime/errors.py": "from spo_runtime.engine import Engine\n"}, "errors (leaf) imports spo_runtime.engine"),
    ({"spo_runtime/engine/engine.py": "from spo_runtime.model.pipeline import X\n"}, "(engine) imports spo_runtime.model.pipeline (model)"),
    ({"spo_runtime/requests.py": "def f():\n    from spo_runtime.engine.engine import Engine\n"}, "import circle"),
    ({"spo_runtime/model/pipeline.py": "import bentoml\n"}, "spo_runtime imports bentoml"),
    ({"spo_runtime/model/pipeline.py": "from service import context\n"}, "spo_runtime imports service"),
    ({"service/a1111.py": "from service.stream import x\n"}, "route module service.a1111 imports route module service.stream"),
    ({"service/context.py": "from service import app\n"}, "(service.base) imports service.app"),
    ({"spo_runtime/engine/engine.py": "x = 1\n" * 501}, "501 lines"),
    ({"spo_runtime/model/pipeline.py": "class Big:\n" + "    x = 1\n" * 300}, "class Big has 301 lines"),
    ({"spo_runtime/model/pipeline.py": "from spo_runtime import Engine\n"}, "imports the package spo_runtime"),
    ({**PREFERENCE, "spo_runtime/model/pipeline.py": "from spo_runtime.preference.scorers import X\n"},
     "(model) imports spo_runtime.preference.scorers (preference)"),
    ({**PREFERENCE, "spo_runtime/engine/engine.py": "from spo_runtime.preference import scorers\n"},
     "(engine) imports spo_runtime.preference.scorers (preference)"),
])
def test_the_checker_catches_each_broken_rule(tmp_path, change, expected):
    _write(tmp_path, {**GOOD, **change})
    problems = check(tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_type_checking_imports_do_not_count(tmp_path):
    _write(tmp_path, {**GOOD, "spo_runtime/requests.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from spo_runtime.engine.engine import Engine\n")})
    assert check(tmp_path) == []
