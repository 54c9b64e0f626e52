"""`taskerman actions`: what is installed, with arguments, defaults, groups and timeouts."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from taskcore.cli.actions import Actions
from taskcore.core.settings import Settings


def run(
    capsys: pytest.CaptureFixture[str], action: str | None = None, json: bool = False
) -> tuple[int, str, str]:
    code = Actions().run(argparse.Namespace(action=action, json=json), Settings())
    out, err = capsys.readouterr()
    return code, out, err


def test_one_action_with_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "service:restart")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "service:restart  (version 1.0; step timeout 3600s)"
    assert "  --arg service=<str>  required" in lines
    assert "  --arg allow_unhealthy=<bool>  default false" in lines


def test_every_installed_action_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, json=True)
    assert code == 0
    infos = {i["name"]: i for i in msgspec.json.decode(out)}
    assert {"redis:restart", "test:sleep", "chaos:kill-process"} <= set(infos)
    signal = next(a for a in infos["chaos:kill-process"]["args"] if a["name"] == "signal")
    assert signal["type"] == "'KILL' | 'TERM' | 'INT' | 'QUIT' | 'HUP'"
    assert {"name": "fail_nodes", "type": "list[str]", "required": False, "default": []} in infos[
        "test:sleep"
    ]["args"]


def test_an_unknown_action_lists_the_installed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "redis:restrat")
    assert (code, out) == (1, "")
    assert "no action 'redis:restrat' is installed here; installed: cassandra:repair" in err
    assert "redis:restart" in err
