"""The architecture rules (tests/architecture.py) hold on today's tree, and each of them
fails on a tree that breaks it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.architecture import (
    MAX_LINES,
    PACKAGE,
    Import,
    Module,
    cycles,
    edges,
    fleet_reaching_runner,
    http_in_assembly,
    layer_violations,
    long_modules,
    rank,
    read_tree,
    shared_class_names,
    shared_file_names,
    third_party_in_core,
    unit,
)

# -- today's tree ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return read_tree()


def _listed(problems: list[str]) -> str:
    return "\n  " + "\n  ".join(problems)


def test_every_module_imports_only_from_the_layers_below_its_own(
    tree: dict[str, Module],
) -> None:
    unplaced = sorted(m for m in tree if rank(unit(m)) is None)
    problems = layer_violations(edges(tree)) + [f"{m} has no layer in LAYERS" for m in unplaced]
    assert not problems, _listed(problems)


def test_core_imports_only_the_standard_library(tree: dict[str, Module]) -> None:
    problems = third_party_in_core(tree)
    assert not problems, _listed(problems)


def test_there_is_no_import_cycle(tree: dict[str, Module]) -> None:
    found = cycles(edges(tree))
    assert not found, _listed([" <-> ".join(cycle) for cycle in found])


def test_the_fleet_never_reaches_the_server_runner(tree: dict[str, Module]) -> None:
    problems = fleet_reaching_runner(edges(tree))
    assert not problems, _listed(problems)


def test_the_assembly_reaches_no_http_framework(tree: dict[str, Module]) -> None:
    problems = http_in_assembly(tree)
    assert not problems, _listed(problems)


def test_no_two_modules_share_a_file_name(tree: dict[str, Module]) -> None:
    problems = shared_file_names(module.path for module in tree.values())
    assert not problems, _listed(problems)


def test_no_two_classes_share_a_name(tree: dict[str, Module]) -> None:
    problems = shared_class_names(tree)
    assert not problems, _listed(problems)


def test_no_module_is_over_the_line_limit(tree: dict[str, Module]) -> None:
    problems = long_modules(tree)
    assert not problems, _listed(problems)


# -- each rule can fail ----------------------------------------------------------------

H = PACKAGE


@pytest.mark.parametrize(
    ("importer", "imported", "type_only", "expected"),
    [
        (f"{H}.core.slot", f"{H}.server.app", False, "from a layer above"),
        (f"{H}.core.slot", f"{H}.generation", False, "from a layer above"),
        (f"{H}.config", f"{H}.server.app", True, "(type-only), from a layer above"),
        (f"{H}.engine.kv", f"{H}.sources.sync", False, "from its own layer"),
        (f"{H}.fleet.replica", f"{H}.demo.run", False, "from its own layer"),
        (f"{H}.sources.sync", f"{H}.backends.files", False, "sources ──► generation, core"),
        (f"{H}.fleet.replica", f"{H}.testing", False, "test support is not product code"),
        (f"{H}.plugins", f"{H}.core", False, "'plugins' has no layer"),
        (f"{H}.engine.kv", f"{H}.backends.files", False, None),
        (f"{H}.server.app", H, False, None),
        (f"{H}.demo.run", f"{H}.testing", False, None),
        (f"{H}.cli", f"{H}.fleet.command", False, None),
        (f"{H}.core.slot", f"{H}.core.version", False, None),
    ],
)
def test_the_layer_rule_names_an_edge_it_refuses(
    importer: str, imported: str, type_only: bool, expected: str | None
) -> None:
    problems = layer_violations([(importer, imported, type_only)])
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1, problems
        assert expected in problems[0]
        assert importer in problems[0]


def test_the_core_rule_names_a_third_party_import() -> None:
    core = Module(f"{H}.core.slot", Path("slot.py"), imports=[Import("torch.nn"), Import("json")])
    server = Module(f"{H}.server.app", Path("app.py"), imports=[Import("fastapi")])
    assert third_party_in_core({m.name: m for m in (core, server)}) == [
        f"{H}.core.slot imports torch.nn"
    ]


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")], [["a", "b", "c"]]),
        ([("a", "a"), ("b", "c")], [["a"]]),
        ([("a", "b"), ("b", "c"), ("a", "c")], []),
    ],
)
def test_the_cycle_rule_finds_each_cycle(
    pairs: list[tuple[str, str]], expected: list[list[str]]
) -> None:
    assert cycles((a, b, False) for a, b in pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("fleet.replica", "server.runner")], ["fleet.replica -> server.runner"]),
        (
            [("fleet.replica", "testing"), ("testing", "server.runner")],
            ["fleet.replica -> testing -> server.runner"],
        ),
        ([("fleet.replica", "server.assembly"), ("cli", "server.runner")], []),
    ],
)
def test_the_runner_rule_names_the_path_from_the_fleet(
    pairs: list[tuple[str, str]], expected: list[str]
) -> None:
    found = [(f"{H}.{a}", f"{H}.{b}", False) for a, b in pairs]
    assert fleet_reaching_runner(found) == [
        " -> ".join(f"{H}.{step}" for step in path.split(" -> ")) for path in expected
    ]


def test_the_assembly_rule_names_the_path_to_the_framework() -> None:
    assembly = Module(f"{H}.server.assembly", Path("a.py"), imports=[Import(f"{H}.server.state")])
    state = Module(f"{H}.server.state", Path("s.py"), imports=[Import("starlette.requests")])
    runner = Module(f"{H}.server.runner", Path("r.py"), imports=[Import("uvicorn")])
    modules = {m.name: m for m in (assembly, state, runner)}
    assert http_in_assembly(modules) == [
        f"{H}.server.assembly -> {H}.server.state imports starlette.requests"
    ]


def test_the_name_rules_name_both_places() -> None:
    src = Path("/src")
    paths = [src / H / "core" / "policy.py", src / H / "sources" / "policy.py"]
    paths += [src / H / "core" / "__init__.py", src / H / "server" / "__init__.py"]
    assert shared_file_names(paths, src) == [
        "policy.py: hotweights/core/policy.py, hotweights/sources/policy.py"
    ]
    one = Module(f"{H}.demo.training", Path("a.py"), classes=["Reply", "Trainer"])
    two = Module(f"{H}.server.replies", Path("b.py"), classes=["Reply"])
    assert shared_class_names({m.name: m for m in (one, two)}) == [
        f"Reply: {H}.demo.training, {H}.server.replies"
    ]


def test_the_length_rule_allows_the_limit_and_names_what_is_over() -> None:
    at = Module(f"{H}.cli", Path("cli.py"), lines=MAX_LINES)
    over = Module(f"{H}.core.reloader", Path("reloader.py"), lines=MAX_LINES + 1)
    assert long_modules({m.name: m for m in (at, over)}) == [
        f"{H}.core.reloader: {MAX_LINES + 1} lines"
    ]


def test_the_reader_sees_lazy_relative_and_type_only_imports(tmp_path: Path) -> None:
    package = tmp_path / H
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("from .slot import Slot\n")
    (package / "core" / "slot.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from hotweights import core\n"
        "from hotweights.core import version, Slot\n"
        "if TYPE_CHECKING:\n"
        "    from hotweights.server.app import App\n"
        "class Slot:\n"
        "    class Lease: ...\n"
        "    def load(self) -> None:\n"
        "        import torch\n"
    )
    (package / "core" / "version.py").write_text("from . import slot\n")
    tree = read_tree(tmp_path)
    assert set(tree) == {H, f"{H}.core", f"{H}.core.slot", f"{H}.core.version"}
    assert set(edges(tree)) == {
        (f"{H}.core", f"{H}.core.slot", False),
        (f"{H}.core.slot", f"{H}.core", False),
        (f"{H}.core.slot", f"{H}.core.version", False),
        (f"{H}.core.slot", f"{H}.server.app", True),
        (f"{H}.core.version", f"{H}.core.slot", False),
    }
    assert tree[f"{H}.core.slot"].classes == ["Slot", "Lease"]
    assert third_party_in_core(tree) == [f"{H}.core.slot imports torch"]
    assert cycles(edges(tree)) == [[f"{H}.core", f"{H}.core.slot", f"{H}.core.version"]]
