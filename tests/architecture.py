"""The layering of DESIGN.md and the naming rules of STYLE.md as checks on src/, read
with `ast` (nothing under src/ is imported or run); `tests/test_architecture.py` runs them.

Every import counts: at module level, inside a function (the lazy imports of the CLI), and
under `if TYPE_CHECKING:` (a type-only import still makes one layer know another's names;
the messages mark them "type-only"). Each rule is a pure function of what was read, so a
test can feed it a fake tree and see it fail.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "hotweights"
MAX_LINES = 400

LAYERS: tuple[tuple[str, ...], ...] = (
    ("hotweights", "errors", "digests"),
    ("core",),
    ("generation",),
    ("backends",),
    ("engine", "sources"),
    ("config", "console"),
    ("server",),
    ("testing",),
    ("demo", "fleet", "push_client"),
    ("cli",),
)
"""From the ground up (DESIGN.md, Layers). A unit is a package under hotweights/ or a
top-level module; it may import its own unit and any unit of a layer below, never one of
its own layer or above. Top-level modules: `hotweights` (the package's `__init__`, only the
version string) sits with `errors` at the ground, and so does `digests` (the file digest
algorithms that the publisher in sources and the loader in backends both use; sources may
not import backends, and core knows nothing of files); `console` (what is printed for a person;
core's notices only) with `config`, under the server, the demo, the fleet and the CLI that
print; `testing` (a thread-hosted server for tests and the demo's scripted run) above the
server it hosts and below the demo that uses it; `push_client` (`hotweights.push`, a
client of a server's admin API) beside the demo and the fleet, under the CLI that uses it."""

ROOT_EXPORTS: Mapping[str, str] = {
    f"{PACKAGE}.push_client": "hotweights.push and hotweights.PushFailed, resolved on first "
    "use (PEP 562 __getattr__)",
}
"""What the package root may name although it sits at the ground: its public client API,
imported only when first asked for, so `import hotweights` loads nothing."""

NARROWER: Mapping[tuple[str, str], str] = {
    ("sources", "backends"): "DESIGN.md draws sources ──► generation, core only",
    ("fleet", "testing"): "test support is not product code; a replica uses server.assembly",
}
"""Edges the layer order would allow that DESIGN.md or STYLE.md rule out."""

FLEET_NEVER_REACHES = f"{PACKAGE}.server.runner"
"""DESIGN.md: the fleet gets a replica's server from the assembly module, never from the
runner, directly or through another module."""

ASSEMBLY = f"{PACKAGE}.server.assembly"
HTTP_FRAMEWORKS = frozenset({"fastapi", "starlette", "uvicorn"})
"""DESIGN.md: nothing imports the HTTP layer to get a server's assembly."""


@dataclass(frozen=True)
class Import:
    target: str
    type_only: bool = False


@dataclass
class Module:
    name: str
    path: Path
    lines: int = 0
    imports: list[Import] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


# -- reading the tree ----------------------------------------------------------------


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_tree(src: Path = SRC) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        name = module_name(path, src)
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        module = Module(name, path, lines=len(text.splitlines()))
        _Reader(module, is_package=path.name == "__init__.py").visit(tree)
        modules[name] = module
    for module in modules.values():
        module.imports = [_resolve(i, modules) for i in module.imports]
    return modules


class _Reader(ast.NodeVisitor):
    def __init__(self, module: Module, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.type_only = False

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        outer, self.type_only = self.type_only, self.type_only or guarded
        for child in node.body:
            self.visit(child)
        self.type_only = outer
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.module.imports.append(Import(alias.name, self.type_only))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.name.split(".")
            if not self.is_package:
                package.pop()
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # `from pkg import name`: an edge to pkg.name if that is a module, else to pkg
        # (resolved once every module is known).
        for alias in node.names:
            self.module.imports.append(Import(f"{base}\0{alias.name}", self.type_only))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.module.classes.append(node.name)
        self.generic_visit(node)


def _resolve(found: Import, modules: Mapping[str, Module]) -> Import:
    if "\0" not in found.target:
        return found
    base, name = found.target.split("\0")
    submodule = f"{base}.{name}"
    return Import(submodule if submodule in modules else base, found.type_only)


def edges(modules: Mapping[str, Module]) -> list[tuple[str, str, bool]]:
    """(importer, imported, type-only) for every import of one of our modules."""
    return [
        (module.name, found.target, found.type_only)
        for module in modules.values()
        for found in module.imports
        if found.target == PACKAGE or found.target.startswith(PACKAGE + ".")
    ]


# -- the rules -----------------------------------------------------------------------


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def rank(name: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    return None


def layer_violations(found: Iterable[tuple[str, str, bool]]) -> list[str]:
    problems: list[str] = []
    for importer, imported, type_only in found:
        source, target = unit(importer), unit(imported)
        if source == target or (importer == PACKAGE and imported in ROOT_EXPORTS):
            continue
        how = " (type-only)" if type_only else ""
        for name in (source, target):
            if rank(name) is None:
                problems.append(f"{importer} -> {imported}: {name!r} has no layer in LAYERS")
        low, high = rank(target), rank(source)
        if low is None or high is None:
            continue
        if low >= high:
            where = "its own layer" if low == high else "a layer above"
            problems.append(f"{importer} imports {imported}{how}, from {where}")
        elif (source, target) in NARROWER:
            reason = NARROWER[source, target]
            problems.append(f"{importer} imports {imported}{how}: {reason}")
    return sorted(set(problems))


def third_party_in_core(modules: Mapping[str, Module]) -> list[str]:
    allowed = set(sys.stdlib_module_names) | {"__future__", PACKAGE}
    return sorted(
        f"{module.name} imports {found.target}"
        for module in modules.values()
        if unit(module.name) == "core"
        for found in module.imports
        if found.target.split(".")[0] not in allowed
    )


def cycles(found: Iterable[tuple[str, str, bool]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing
    itself), each sorted; Tarjan's algorithm."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in found:
        graph.setdefault(importer, set()).add(imported)
        graph.setdefault(imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def reached(found: Iterable[tuple[str, str, bool]], start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or through others, with one import path."""
    graph: dict[str, list[str]] = {}
    for importer, imported, _ in found:
        graph.setdefault(importer, []).append(imported)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return paths


def fleet_reaching_runner(found: Iterable[tuple[str, str, bool]]) -> list[str]:
    """Fleet modules from which `FLEET_NEVER_REACHES` is reachable, with the path."""
    found = list(found)
    starts = sorted({importer for importer, _, _ in found if unit(importer) == "fleet"})
    return [
        " -> ".join(paths[FLEET_NEVER_REACHES])
        for paths in (reached(found, start) for start in starts)
        if FLEET_NEVER_REACHES in paths
    ]


def http_in_assembly(modules: Mapping[str, Module]) -> list[str]:
    """Imports of an HTTP framework by `ASSEMBLY` or any module it reaches."""
    paths = reached(edges(modules), ASSEMBLY)
    return sorted(
        f"{' -> '.join(path)} imports {found.target}"
        for name, path in paths.items()
        if name in modules
        for found in modules[name].imports
        if found.target.split(".")[0] in HTTP_FRAMEWORKS
    )


def shared_file_names(paths: Iterable[Path], src: Path = SRC) -> list[str]:
    by_name: dict[str, list[str]] = {}
    for path in paths:
        if path.name != "__init__.py":
            by_name.setdefault(path.name, []).append(str(path.relative_to(src)))
    return [
        f"{name}: {', '.join(sorted(where))}"
        for name, where in sorted(by_name.items())
        if len(where) > 1
    ]


def shared_class_names(modules: Mapping[str, Module]) -> list[str]:
    by_name: dict[str, list[str]] = {}
    for module in modules.values():
        for name in module.classes:
            by_name.setdefault(name, []).append(module.name)
    return [
        f"{name}: {', '.join(sorted(where))}"
        for name, where in sorted(by_name.items())
        if len(where) > 1
    ]


def long_modules(modules: Mapping[str, Module], limit: int = MAX_LINES) -> list[str]:
    return sorted(
        f"{module.name}: {module.lines} lines"
        for module in modules.values()
        if module.lines > limit
    )
