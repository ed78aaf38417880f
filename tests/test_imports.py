"""vitclt's modules import one another without circles (every import counts: top level, in functions, for type checking)."""

import ast
import importlib
from pathlib import Path

import vitclt

ROOT = Path(vitclt.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = ROOT.parent.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def exported_from(package: str, name: str) -> str | None:
    """The submodule a package's lazy exports take `name` from (vitclt.lazy), if any."""
    if not (ROOT.parent.joinpath(*package.split(".")) / "__init__.py").is_file():
        return None
    submodule = getattr(importlib.import_module(package), "_EXPORTS", {}).get(name)
    return f"{package}.{submodule}" if submodule else None


def imports_of(path: Path) -> set[str]:
    """The vitclt modules `path` imports; `from package import name` counts as the module that defines name."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if is_module(full) else exported_from(base, alias.name) or base)
    return {m for m in out if m.split(".")[0] == "vitclt" and m != here}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a path back to its start."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in graph[path[-1]] if w in component)
            path.append(nxt)
            if nxt in seen:
                out.append(path[path.index(nxt):])
                break
            seen.add(nxt)
    return out


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_imports_resolve_relative_and_lazily_exported_names():
    graph = import_graph()
    assert "vitclt.backbones.base" in graph["vitclt.backbones.heads"]  # from .base import Backbone
    assert "vitclt.nn.formats" in graph["vitclt.nn.transcoder"]  # from vitclt.nn import formats
    assert "vitclt.nn.transcoder" in graph["vitclt.training.runner"]  # from vitclt.nn import Transcoder (lazy export)


def test_no_module_of_vitclt_imports_itself_through_others():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)
