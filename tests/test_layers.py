"""The layers docs/design.md describes: imports run down them, never up, and never in a circle.

Every import counts, those inside functions too: a deferred import still ties the two modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own layer and those before it.
LAYERS = (
    ("app.config", "app.logs"),
    ("app.metrics",),
    ("app.connection",),
    ("app.storage",),
    ("app.api",),
    ("app.main",),
    ("app.serving",),
    ("app.__main__", "app.demo"),
)
# What the server may use of the client: its public modules, not the command's.
CLIENT_PUBLIC = ("client", "client.address", "client.net", "client.wait")


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("app", "client"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import module`` imports that module; ``from module import name``, the module.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # The longest project module the name falls in (``from app.api import errors`` is app.api.errors).
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_app_module_is_in_a_layer() -> None:
    loose = [n for n in MODULES if n.startswith("app.") and _layer(n) is None]
    assert loose == [], f"add these to LAYERS (and to docs/design.md): {loose}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("app.")))
def test_app_imports_run_down_the_layers(name: str) -> None:
    own = _layer(name)
    assert own is not None
    up = [t for t in GRAPH[name] if t.startswith("app.") and (_layer(t) or 0) > own]
    assert up == [], f"{name} imports a higher layer: {up}"
    private_client = [
        t
        for t in GRAPH[name]
        if t.startswith("client")
        and not any(t == p or t.startswith(p + ".") for p in CLIENT_PUBLIC[1:])
        and t != "client"
    ]
    assert private_client == [], f"{name} imports the client's private modules: {private_client}"


def test_the_client_never_imports_the_server() -> None:
    offenders = {n: [t for t in ts if t == "app" or t.startswith("app.")] for n, ts in GRAPH.items()}
    assert {n: ts for n, ts in offenders.items() if n.startswith("client") and ts} == {}


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components over the whole graph: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            # A package importing its own submodule (``__init__`` re-exports) is not a circle.
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


def test_the_graph_is_read() -> None:
    """Guards the test itself: the graph holds edges we know exist."""
    assert "app.api.errors" in GRAPH["app.api.routes.messages"] or any(
        t.startswith("app.api.errors") for t in GRAPH["app.api.routes.messages"]
    )
    assert "client.address" in GRAPH["app.config"]
