"""The project's import graph has no cycle, deferred imports included (issue 22).

A cycle hidden behind an import inside a function is still a cycle: the two modules cannot be
understood, tested or moved apart. This test reads every module of the project's own packages with
`ast` (nothing is imported, so it needs neither TensorFlow nor LiteRT), collects every import
statement wherever it sits -- module level, inside functions, under `if TYPE_CHECKING` -- and
fails naming each cycle it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's own import packages: the core (faceberry/) and the card's folders, which are faceberry.<folder>.
PACKAGES = ("device", "train", "convert", "models", "faceberry")
CARD = ("device", "train", "convert", "models")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if root == ROOT and parts[0] in CARD:
        parts.insert(0, "faceberry")
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        folder = ROOT / package
        if not (folder / "__init__.py").is_file():
            continue
        for path in sorted(folder.rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    # A relative import counts from the module's package: the module itself when it is a package.
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop] if drop else base
    return ".".join([*base, node.module] if node.module else base)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` lands on: itself, or the nearest package above it."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                # `from device import config` imports the submodule faceberry.device.config.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != module:
                    graph[module].add(owner)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other, only those of two or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        # Iterative, so a long chain of imports cannot hit the recursion limit.
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return groups


def _cycle_in(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete loop through the group's first module, to name in the failure."""
    members = set(group)
    start = group[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    nxt.append(child)
        frontier = nxt
    return group


def test_the_reader_sees_deferred_relative_and_module_imports(tmp_path: Path) -> None:
    # The reader itself, on a throwaway package: an import inside a function, a relative one and
    # `from pkg import module` each make an edge; a name imported from a module points at that module.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from .c import thing\n")
    (pkg / "c.py").write_text("import json\nthing = 1\n")
    modules = {_module_name(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}
    graph = import_graph(modules)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(loop) == [["a", "b", "c"]]
    assert _cycle_in(["a", "b", "c"], loop) == ["a", "b", "c", "a"]


def test_the_project_graph_is_read() -> None:
    # A guard against the test passing on an empty graph: known edges, one of them deferred (inside a function).
    graph = import_graph(project_modules())
    assert "faceberry.errors" in graph["faceberry.device.config"]
    assert "faceberry.train.dlib_port" in graph["faceberry.train.backbone"]


def test_no_import_cycle() -> None:
    graph = import_graph(project_modules())
    cycles = [" -> ".join(_cycle_in(group, graph)) for group in strongly_connected(graph)]
    assert not cycles, (
        "import cycles (deferred imports count too); break each by moving what both sides need into a module "
        "of its own:\n" + "\n".join(cycles)
    )


def test_the_core_imports_no_program() -> None:
    """The rule of docs/ARCHITECTURE.md: the core (faceberry/*.py) is what train, convert and the device share,
    so it imports none of them (deferred imports count too)."""
    graph = import_graph(project_modules())
    core = [m for m in graph if m.count(".") == 1 and m.split(".")[1] not in CARD]
    assert len(core) >= 10, core
    programs = tuple(f"faceberry.{top}" for top in CARD)
    wrong = {m: sorted(t for t in graph[m] if t.startswith(programs)) for m in core}
    assert not {m: t for m, t in wrong.items() if t}, wrong
