"""Check the import graph of Taskerman's own modules: no cycles, and the layers hold.

Every `import` and `from ... import` counts, wherever it is written: at module level, inside a
function, or under `if TYPE_CHECKING:` (a cycle that only type checking sees is still a design
cycle). An import names the deepest of our modules it reaches (`from taskcore.core import model`
is an edge to `taskcore.core.model`); the parent packages it also executes are not counted.

Layers: `taskcore` imports no service package and not `taskerman_dev`; a service package imports
no other service package and not `taskerman_dev`. `taskerman_dev` may import anything.

Usage: python scripts/check_imports.py [--allow a.b,a.c ...] [--allow-import a.b:c.d ...]
Each `--allow` names the modules of one known cycle, and each `--allow-import` one known import
across layers; they are reported but do not fail the check.
Exit status 1 on any other cycle or on a layering violation.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = [
    ROOT / "libs" / "taskcore",
    ROOT / "libs" / "taskerman-dev",
    ROOT / "services" / "router",
    ROOT / "services" / "runner",
    ROOT / "services" / "scheduler",
]
LIBRARY = "taskcore"
DEV = "taskerman_dev"
SERVICES = frozenset({"taskerman_router", "taskerman_runner", "taskerman_scheduler"})
PACKAGES = frozenset({LIBRARY, DEV, *SERVICES})

Graph = dict[str, set[str]]
MAX_CYCLES_PER_GROUP = 20


def discover(roots: Iterable[Path], packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> source file, for every module of `packages` found under `roots`."""
    wanted = set(packages)
    modules: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not parts or parts[0] not in wanted:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _deepest(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is one of `modules`."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from` import starts at, resolving relative levels."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of `modules` that `module` (source at `path`) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        for name in names:
            target = _deepest(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def build_graph(modules: Mapping[str, Path]) -> Graph:
    """Module -> the modules it imports."""
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach one another (Tarjan), each sorted; singletons left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep graph cannot hit the recursion limit.
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def cycles_in(
    graph: Mapping[str, set[str]], group: list[str], limit: int = MAX_CYCLES_PER_GROUP
) -> list[list[str]]:
    """Elementary cycles among `group`, each starting at its smallest module and ending where it
    started (`[a, b, a]`); at most `limit`."""
    members = set(group)
    found: list[list[str]] = []

    def walk(path: list[str]) -> None:
        start = path[0]
        for nxt in sorted(graph.get(path[-1], set()) & members):
            if len(found) >= limit:
                return
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk([*path, nxt])

    for start in group:
        walk([start])
    return found


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every import cycle (up to a limit per tangle), as a chain that returns to its first module."""
    return [cycle for group in strongly_connected(graph) for cycle in cycles_in(graph, group)]


def layer_violations(graph: Mapping[str, set[str]]) -> list[tuple[str, str, str]]:
    """Imports that cross a layer the wrong way: (module, imported module, the rule broken)."""
    problems: list[tuple[str, str, str]] = []
    for module in sorted(graph):
        source = module.split(".")[0]
        for target in sorted(graph[module]):
            dest = target.split(".")[0]
            if source == LIBRARY and (dest in SERVICES or dest == DEV):
                problems.append((module, target, f"taskcore must not import {dest}"))
            elif source in SERVICES and dest != source and (dest in SERVICES or dest == DEV):
                problems.append((module, target, f"a service must not import {dest}"))
    return problems


def check(
    graph: Mapping[str, set[str]],
    allowed_cycles: Iterable[frozenset[str]] = (),
    allowed_imports: Iterable[tuple[str, str]] = (),
) -> tuple[list[str], list[str]]:
    """(failures, notes): a line per forbidden cycle or layer violation, and a line per allowed one."""
    cycles_ok = set(allowed_cycles)
    imports_ok = set(allowed_imports)
    failures: list[str] = []
    notes: list[str] = []
    for cycle in find_cycles(graph):
        line = "cycle: " + " -> ".join(cycle)
        (notes if frozenset(cycle) in cycles_ok else failures).append(line)
    for module, target, rule in layer_violations(graph):
        line = f"layering: {module} -> {target}: {rule}"
        (notes if (module, target) in imports_ok else failures).append(line)
    return failures, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE,MODULE",
        help="the modules of a known cycle that does not fail the check (repeatable)",
    )
    parser.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE:IMPORTED",
        help="a known import across layers that does not fail the check (repeatable)",
    )
    args = parser.parse_args(argv)
    cycles_ok = [frozenset(m.strip() for m in spec.split(",") if m.strip()) for spec in args.allow]
    imports_ok: list[tuple[str, str]] = []
    for spec in args.allow_import:
        module, sep, target = spec.partition(":")
        if not sep:
            parser.error(f"--allow-import wants MODULE:IMPORTED, not {spec!r}")
        imports_ok.append((module.strip(), target.strip()))
    modules = discover(SOURCE_ROOTS, PACKAGES)
    failures, notes = check(build_graph(modules), cycles_ok, imports_ok)
    for line in notes:
        print(f"allowed {line}")
    for line in failures:
        print(line)
    if failures:
        print(f"check_imports: {len(failures)} problem(s) in {len(modules)} modules", file=sys.stderr)
        return 1
    print(f"check_imports: {len(modules)} modules, no forbidden cycle or layer crossing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
