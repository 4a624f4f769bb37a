"""common/'s architecture, checked from the source: the folder tree is the diagram, and these rules keep it true.

- no import cycle between common/'s modules;
- no project import inside a function (an import cycle dodged is still a cycle);
- each subpackage imports only the floors below it: llama (the numpy math) nothing of the project
  but its own pieces; quant (the integer math) the float math and the door's InputError; files the
  door (cli, paths) and the integer math (step 1 --quant writes quantized weights), never the float
  math's checks; model the files and the math (RoPE's table of scalings); check anything below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

COMMON = ROOT / "common"
# subpackage -> the subpackages it may import ("" = common/cli.py, common/paths.py: the door)
ALLOWED = {"": {""}, "llama": {"llama"}, "quant": {"", "quant", "llama"}, "files": {"", "files", "quant"},
           "model": {"", "files", "llama", "quant", "model"},
           "check": {"", "files", "llama", "quant", "model", "check"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(COMMON.rglob("*.py"))}


def project_imports(tree: ast.AST, known: set[str]) -> list[tuple[ast.AST, str]]:
    """(node, module) for every import of a common module, `from common.files import layout` naming common.files.layout."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name.split(".")[0] == "common"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((node, sub if sub in known else node.module))
    return out


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: {m for _, m in project_imports(ast.parse(path.read_text()), known)} - {name}
            for name, path in modules().items()}


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m] if m in path else path + [m]
            if m not in state and (c := visit(m, path + [m])):
                return c
        state[n] = 2
        return None
    for n in sorted(g):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_common_has_no_import_cycle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_project_import_inside_a_function():
    known = set(modules())
    inside = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        inside += [f"{path.relative_to(ROOT)}:{node.lineno}" for node, _ in project_imports(tree, known)
                   if id(node) not in top]
    assert not inside, inside


def test_each_floor_imports_only_the_floors_below():
    bad = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
           if b.startswith("common") and floor(b) not in ALLOWED[floor(a)]]
    assert not bad, bad


def test_the_math_imports_nothing_of_the_project_but_itself():
    for name, deps in graph().items():
        if floor(name) == "llama":
            assert all(d.startswith("common.llama") for d in deps), (name, deps)


# --- planted mistakes: each rule must catch its own violation --------------------------------------

def test_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_planted_function_import_and_upward_import_are_found():
    tree = ast.parse("import numpy\ndef f():\n    from common.files import layout\n")
    known = {"common.files.layout"}
    [(node, mod)] = project_imports(tree, known)
    assert mod == "common.files.layout" and node not in tree.body
    assert floor("common.files.layout") not in ALLOWED[floor("common.llama.rope")]
    assert floor("common.cli") == "" and floor("common.check") == "check"
