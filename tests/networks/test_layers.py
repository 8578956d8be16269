"""The package's layering, read from the source: no import circle (imports inside functions count too), the
CLI on top and thin, no private names imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "resunetpp"


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in SRC.rglob("*.py")}


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module of this package, the names taken from it, line) for every import in `module`."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            if not target.startswith("resunetpp"):
                continue
            for alias in node.names:  # `from . import x` takes the module x; `from .m import x` takes a name of m
                sub = f"{target}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in MODULES else (target, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "resunetpp"]
    return found


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `edges` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_import_graph_is_read_correctly():
    edges = graph()
    assert len(MODULES) > 40
    assert "resunetpp.networks.blocks" in edges["resunetpp.networks.resunetpp"]
    assert "resunetpp.inference.transforms" in edges["resunetpp.inference.segmenter"]
    assert {"resunetpp.cli.data", "resunetpp.cli.train"} <= edges["resunetpp.cli"]  # `from . import data, ...`
    assert "resunetpp.data.folder" in edges["resunetpp.cli.data"]  # an import inside a function
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"], ["b", "c", "a", "b"])
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    found = cycle(graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_the_cli_is_the_top_layer_and_thin():
    edges = graph()
    for module, targets in edges.items():
        if not module.startswith("resunetpp.cli"):
            assert not any(t.startswith("resunetpp.cli") for t in targets), f"{module} imports the CLI"
        if not module.startswith(("resunetpp.cli", "resunetpp.serve")):
            assert not any(t.startswith("resunetpp.serve") for t in targets), f"{module} imports serve"
    for module, path in MODULES.items():
        heavy = [n for n in ("torch", "numpy", "cv2") if f"import {n}" in path.read_text()]
        if module.startswith("resunetpp.cli"):
            assert not heavy, f"{module} imports {heavy}: the CLI parses and calls the library, it computes nothing"
        else:
            assert "import typer" not in path.read_text(), f"{module} (library) imports typer"


def test_no_private_name_is_imported_from_another_module():
    private = [f"{MODULES[m].relative_to(SRC.parent)}:{line} takes {t}.{n}" for m in MODULES
               for t, names, line in imports(m) for n in names if n.startswith("_") and n != "__version__"]
    assert not private, "private names imported across modules: " + "; ".join(private)
