"""The package's layers point one way (docs/architecture.md, "Layers").

The static import graph of the package (every ``import`` read with :mod:`ast`, inside
functions too; only ``if TYPE_CHECKING:`` blocks are left out, as they never run)
follows the direction table :data:`MAY_IMPORT`, which is itself acyclic and is the
table the docs show; no two layers and no two modules import each other; the client
libraries of Kafka, Girder and Prefect are imported by their layer only; and importing
a hop in a fresh interpreter loads none of the layers above it and at most the number
of package modules written below.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "girder_upload_stream"
#: Where each part of the installed package lives in the checkout (pyproject.toml).
SOURCES = {PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.flows": ROOT / "flows",
           f"{PACKAGE}.tasks": ROOT / "tasks"}

#: Top-level modules and the layer each belongs to. A new one must be placed here.
TOP_MODULES = {
    "": "base",  # the package's __init__
    "errors": "base", "redact": "base", "text_bounds": "base", "timings": "base",
    "failpoints": "base", "startup": "base", "retry_policy": "base", "memory_plan": "base",
    "shared_types": "base", "request_tally": "base",
    "settings": "config", "options": "config", "folder_lock": "config",
}
#: The Prefect and command-line top: it may import every layer and no layer imports it.
TOP = {"cli", "prefect_glue", "flows", "tasks"}

#: The direction table: what each layer may import (besides its own modules). Lowest
#: first. ``producer`` is ``wire/producer.py``, the one module of ``wire/`` that does
#: I/O: it reads files and produces them through ``kafka/chunk_producer.py``.
MAY_IMPORT: dict[str, set[str]] = {
    "base": set(),
    "wire": {"base"},
    "assembly": {"base", "wire"},
    "registry": {"base", "wire"},
    "config": {"base", "wire", "assembly"},
    "ledger": {"base", "wire", "assembly"},
    "kafka": {"base", "wire", "config", "registry"},
    "girder": {"base", "wire", "config"},
    "producer": {"base", "wire", "kafka"},
    "loop": {"base", "wire", "assembly", "registry", "config", "ledger", "kafka", "girder"},
    "top": {"base", "wire", "assembly", "registry", "config", "ledger", "kafka", "girder",
            "producer", "loop"},
}


def layer(module: str) -> str:
    """The layer of a module of the package (its dotted name)."""
    parts = module.split(".")[1:]
    if module == f"{PACKAGE}.wire.producer":
        return "producer"
    if parts and parts[0] in TOP:
        return "top"
    if parts and (SOURCES[PACKAGE] / parts[0]).is_dir():
        return parts[0]
    name = parts[0] if parts else ""
    assert name in TOP_MODULES, f"{module}: place it in a layer (TOP_MODULES in {__file__})"
    return TOP_MODULES[name]


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """``(imported module, line)`` for every import the module runs, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (i for child in node.orelse for i in _imports(child, module, is_package))
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([node.module] if node.module else []))
            yield base, node.lineno
            # ``from package import module`` imports that module
            yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        yield from _imports(node, module, is_package)


def import_graph() -> dict[str, set[tuple[str, int]]]:
    """Module -> the package's modules it imports, with the line."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {(name, line) for name, line in
                         _imports(tree, module, path.name == "__init__.py")
                         if name in modules}
    return graph


def layer_edges() -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) -> where, for every import across layers."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, targets in import_graph().items():
        for target, line in sorted(targets):
            if layer(module) != layer(target):
                edges.setdefault((layer(module), layer(target)), []).append(
                    f"{module}:{line} imports {target}")
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (node -> successors), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_direction_table_has_no_cycle():
    """Allowing an upward import in the table would make it cyclic: this fails then."""
    assert find_cycle(MAY_IMPORT) is None, find_cycle(MAY_IMPORT)
    assert all(below <= MAY_IMPORT.keys() for below in MAY_IMPORT.values())


def test_the_docs_show_the_direction_table():
    """docs/architecture.md's "Layers" table says what MAY_IMPORT says."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("### Layers"):]
    rows = [line.split("|")[1:-1] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| layer ", "| ---"))]
    shown = {name.strip(): {n.strip() for n in may.split(",") if n.strip()}
             for name, _, may in rows}
    assert shown == MAY_IMPORT


def test_every_import_follows_the_direction_table():
    wrong = {f"{a} -> {b}": where for (a, b), where in layer_edges().items()
             if b not in MAY_IMPORT[a]}
    assert not wrong, ("imports against the layers (docs/architecture.md, 'Layers'); move "
                       f"the shared type to girder_upload_stream/shared_types.py: {wrong}")


def test_no_cycle_between_the_layers_nor_between_modules():
    layers: dict[str, set[str]] = {}
    for a, b in layer_edges():
        layers.setdefault(a, set()).add(b)
    assert find_cycle(layers) is None, find_cycle(layers)
    modules = {m: {t for t, _ in targets if t != m} for m, targets in import_graph().items()}
    assert find_cycle(modules) is None, find_cycle(modules)


#: The outside systems' client libraries, and the only layers that may import them: the
#: core (wire, assembly, ledger, registry, loop) knows none of them.
CLIENTS = {"confluent_kafka": {"kafka", "top"}, "kafkacrypto": {"kafka"},
           "girder_client": {"girder"}, "requests": {"girder"}, "prefect": {"top"}}


def test_only_the_io_layers_import_the_clients():
    wrong = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for name, line in _imports(tree, module, path.name == "__init__.py"):
            allowed = CLIENTS.get(name.split(".")[0])
            if allowed is not None and layer(module) not in allowed:
                wrong.append(f"{module}:{line} imports {name}")
    assert not wrong, wrong


def test_the_checks_see_an_upward_import():
    """The graph reads imports inside functions, leaves TYPE_CHECKING blocks out, and a
    wire -> ledger import breaks the table (the check above cannot pass vacuously)."""
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from girder_upload_stream.loop import runner\n"
              "def f():\n    from girder_upload_stream.ledger import processor\n")
    found = {name for name, _ in _imports(ast.parse(source), f"{PACKAGE}.wire.codec", False)}
    assert f"{PACKAGE}.ledger.processor" in found
    assert not any(name.startswith(f"{PACKAGE}.loop") for name in found)
    assert "ledger" not in MAY_IMPORT[layer(f"{PACKAGE}.wire.codec")]
    assert layer(f"{PACKAGE}.kafka.clients") not in MAY_IMPORT["ledger"]


def loaded_modules(module: str) -> list[str]:
    """The package's modules that importing ``module`` loads in a fresh interpreter."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == {PACKAGE!r})))")
    done = subprocess.run([sys.executable, "-c", code, module], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout)


#: What importing each hop must not load, and the most package modules it may load
#: (measured when the shared types moved to shared_types.py: 11, 16 and 35; before, the
#: producer loaded 45, the consumer group 44; the core grew by one module of its own
#: since, ledger/put_off.py, offsets rule 10; the consumer group by one,
#: kafka/gain_marks.py, the twin-check rule of a group re-keyed by file).
HOPS = {
    f"{PACKAGE}.wire.producer": (
        ("ledger", "loop", "registry", "girder", "assembly", "kafka.clients"), 11),
    f"{PACKAGE}.kafka.clients": (("ledger", "loop", "registry", "girder", "assembly"), 17),
    f"{PACKAGE}.ledger.processor": (("kafka", "girder", "loop", "registry"), 38),
}


@pytest.mark.parametrize("module", sorted(HOPS))
def test_a_hop_loads_only_what_it_uses(module):
    forbidden, most = HOPS[module]
    loaded = loaded_modules(module)
    above = [m for m in loaded for f in forbidden
             if m == f"{PACKAGE}.{f}" or m.startswith(f"{PACKAGE}.{f}.")]
    assert not above, f"importing {module} loads {above}"
    assert len(loaded) <= most, f"importing {module} loads {len(loaded)} modules: {loaded}"
