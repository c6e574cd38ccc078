"""The layering of docs/ARCHITECTURE.md holds: no import cycle, no upward import, no private name across modules.

Every `import` and `from ... import` in the package counts, including the ones inside functions (a lazy import
still ties two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llm2emb"

FLOORS = {
    "llm2emb.cli": 4,
    "llm2emb.model.embedder": 2,
    "llm2emb.model.folder": 2,
    "llm2emb.model.encoding": 2,
}
"""Floor of each module: 4 the command line, 3 the commands (llm2emb.commands, the corpus command, evaluate,
integrations, train), 2 the Embedder (the class and the two modules of its folder format and encoding), 1 its parts
and the shared helpers. Modules not listed take their floor from COMMANDS / the default 1."""
COMMANDS = ("llm2emb.commands", "llm2emb.retrieval.corpus", "llm2emb.evaluate", "llm2emb.integrations", "llm2emb.train")
ROOT_MODULES = {"__init__", "assets", "cli", "devices", "errors", "files", "hf_tables", "readers"}
"""The package root holds the command line and the helpers every floor shares; everything else lives in the
subpackage of its concern (docs/ARCHITECTURE.md, "where does X go")."""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def floor(name: str) -> int:
    if name in FLOORS:
        return FLOORS[name]
    return 3 if any(name == c or name.startswith(c + ".") for c in COMMANDS) else 1


def imports(known: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports; and every private name imported from another module."""
    def resolve(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {name: set() for name in known}
    private = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm2emb"):
                for alias in node.names:
                    edges[name].add(resolve(f"{node.module}.{alias.name}"))
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[name].update(resolve(a.name) for a in node.names if a.name.startswith("llm2emb"))
        edges[name].discard(name)
        edges[name].discard("")
    return edges, private


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_and_no_private_name_crosses_a_module():
    edges, private = imports(modules())
    assert cycle(edges) is None, " -> ".join(cycle(edges))
    assert private == []


def test_nothing_imports_upward():
    edges, _ = imports(modules())
    upward = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
              for a, targets in edges.items() if a != "llm2emb" for b in targets
              if b != "llm2emb" and floor(b) > floor(a)]
    assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The helpers above are not vacuous: they catch what they look for."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert floor("llm2emb.train.runner") == 3 > floor("llm2emb.model.embedder") == 2 > floor("llm2emb.pooling.mean") == 1
    edges, _ = imports(modules())
    assert "llm2emb.model.embedder" in edges["llm2emb.train.setup"]  # lazy (function-level) imports are counted too


def test_package_root_holds_only_the_shared_helpers():
    strays = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem not in ROOT_MODULES)
    assert not strays, f"modules at the package root that belong in a subpackage: {strays}"
