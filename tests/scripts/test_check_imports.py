"""scripts/check_imports.py on small synthetic packages written to tmp_path."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_imports.py"


@pytest.fixture(scope="module")
def check_imports() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def _graph(check_imports: ModuleType, root: Path, packages: set[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = check_imports.build_graph(check_imports.discover([root], packages))
    return graph


def test_every_kind_of_import_is_an_edge(check_imports: ModuleType, tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": """
                from typing import TYPE_CHECKING

                import json
                import pkg.b
                from pkg import c
                from .d import thing

                if TYPE_CHECKING:
                    from pkg.e import Kind


                def later() -> None:
                    from . import f
                """,
            **{f"pkg/{m}.py": "thing = 1\nKind = int\n" for m in "bcdef"},
            "other/__init__.py": "import pkg.a\n",
        },
    )
    graph = _graph(check_imports, root, {"pkg"})
    assert graph["pkg.a"] == {"pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.f"}  # json is not ours
    assert "other" not in graph  # only the packages asked for


def test_cycles_are_chains_back_to_their_first_module(check_imports: ModuleType, tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/api.py": """
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from pkg.service import Service
                """,
            "pkg/service.py": "from pkg import api\n",
            "pkg/x.py": "def f() -> None:\n    from pkg import y\n",
            "pkg/y.py": "from pkg import z\n",
            "pkg/z.py": "import pkg.x\n",
            "pkg/leaf.py": "from pkg import api\n",
        },
    )
    cycles = check_imports.find_cycles(_graph(check_imports, root, {"pkg"}))
    assert cycles == [["pkg.api", "pkg.service", "pkg.api"], ["pkg.x", "pkg.y", "pkg.z", "pkg.x"]]


def test_no_cycles_in_a_tree(check_imports: ModuleType, tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b, c\n",
            "pkg/b.py": "from pkg import c\n",
            "pkg/c.py": "",
        },
    )
    assert check_imports.find_cycles(_graph(check_imports, root, {"pkg"})) == []


def test_two_cycles_through_one_module_are_both_reported(check_imports: ModuleType) -> None:
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert check_imports.find_cycles(graph) == [["a", "b", "a"], ["a", "c", "a"]]


def test_allowed_cycles_and_imports_are_notes(check_imports: ModuleType) -> None:
    graph = {
        "taskcore.cli.main": {"taskcore.cli.plan", "taskerman_dev.devstack"},
        "taskcore.cli.plan": {"taskcore.cli.main"},
        "taskerman_dev.devstack": set(),
    }
    failures, notes = check_imports.check(graph)
    assert len(failures) == 2
    assert notes == []
    failures, notes = check_imports.check(
        graph,
        [frozenset({"taskcore.cli.main", "taskcore.cli.plan"})],
        [("taskcore.cli.main", "taskerman_dev.devstack")],
    )
    assert failures == []
    assert notes == [
        "cycle: taskcore.cli.main -> taskcore.cli.plan -> taskcore.cli.main",
        "layering: taskcore.cli.main -> taskerman_dev.devstack: taskcore must not import taskerman_dev",
    ]


def test_layers(check_imports: ModuleType) -> None:
    graph = {
        "taskcore.core.model": {"taskerman_router.routing"},
        "taskcore.packs.redis": {"taskerman_dev.launchers"},
        "taskerman_router.app": {
            "taskcore.core.model",
            "taskerman_router.routing",
            "taskerman_runner.worker",
        },
        "taskerman_runner.worker": {"taskerman_dev.actions"},
        "taskerman_dev.demo": {"taskerman_router.app", "taskcore.core.model"},
        "taskerman_router.routing": set(),
        "taskerman_dev.launchers": set(),
        "taskerman_dev.actions": set(),
    }
    assert check_imports.layer_violations(graph) == [
        ("taskcore.core.model", "taskerman_router.routing", "taskcore must not import taskerman_router"),
        ("taskcore.packs.redis", "taskerman_dev.launchers", "taskcore must not import taskerman_dev"),
        ("taskerman_router.app", "taskerman_runner.worker", "a service must not import taskerman_runner"),
        ("taskerman_runner.worker", "taskerman_dev.actions", "a service must not import taskerman_dev"),
    ]
