"""The webhooks file, who gets which notice, the body and its signature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskerman_scheduler import webhooks
from taskerman_scheduler.webhooks import Notice, Webhook, WebhookError

SECRET = "0123456789abcdef-secret"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "webhooks.toml"
    path.write_text(text)
    return path


def test_a_webhooks_file_loads_with_its_secret_from_a_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[webhook]]\nname = "oncall"\nurl = "https://example.test/h"\nsecret_env = "HOOK_SECRET"\n'
        'events = ["failed"]\nclusters = ["demo:*"]\n',
    )
    hooks = webhooks.load(path, env={"HOOK_SECRET": SECRET})
    hook = hooks["oncall"]
    assert hook.secret == SECRET.encode()
    assert hook.events == frozenset({"failed"})
    assert SECRET not in repr(hook)  # a log line of the hook never shows its secret


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('name = "a b"\nurl = "https://x.test"\nsecret_env = "S"', "`name` must be"),
        ('name = "a"\nurl = "ftp://x.test"\nsecret_env = "S"', "`url` must be an http"),
        ('name = "a"\nurl = "https://x.test"', "give a shared secret"),
        ('name = "a"\nurl = "https://x.test"\nsecret_env = "SHORT"', "at least 16 characters"),
        ('name = "a"\nurl = "https://x.test"\nsecret_env = "S"\nevents = ["done"]', "`events` must be"),
        ('name = "a"\nurl = "https://x.test"\nsecret_env = "S"\nretry = 1', "unknown field(s) retry"),
        ('name = "a"\nurl = "https://x.test"\nsecret_file = "/nonexistent"', "cannot be read"),
    ],
)
def test_a_wrong_webhook_is_refused_saying_what_and_where(tmp_path: Path, table: str, says: str) -> None:
    path = write(tmp_path, f"[[webhook]]\n{table}\n")
    with pytest.raises(WebhookError) as e:
        webhooks.load(path, env={"S": SECRET, "SHORT": "short"})
    assert says in str(e.value)
    assert "webhook 1" in str(e.value)


def test_two_webhooks_of_one_name_are_refused(tmp_path: Path) -> None:
    one = '[[webhook]]\nname = "a"\nurl = "https://x.test"\nsecret_env = "S"\n'
    with pytest.raises(WebhookError, match="used twice"):
        webhooks.load(write(tmp_path, one + one), env={"S": SECRET})


def test_who_gets_what() -> None:
    follows = Webhook(name="ops", url="https://x.test", clusters=("demo:*",))
    named_only = Webhook(name="alice", url="https://x.test", events=frozenset({"finished"}))
    failed = Notice(id="end:t1", kind="failed", at=0.0, task_id="t1", cluster="demo:web")
    assert webhooks.wanted(follows, failed)
    assert not webhooks.wanted(named_only, failed)  # neither its cluster nor named by the task
    assert webhooks.wanted(named_only, failed, named=("alice",))  # a failed task has finished too
    breaker = Notice(id="b:1", kind="breaker-opened", at=0.0, cluster="demo:web")
    assert not webhooks.wanted(named_only, breaker, named=("alice",))


def test_the_body_is_slack_compatible_and_the_signature_covers_time_and_body() -> None:
    hook = Webhook(name="ops", url="https://x.test", secret=SECRET.encode())
    notice = Notice(id="end:t1", kind="finished", at=1.0, task_id="t1", cluster="c", state="succeeded")
    payload = webhooks.body(notice)
    assert json.loads(payload)["text"] == ":white_check_mark: task `t1` on `c` finished (succeeded)"
    h = webhooks.headers(hook, notice, payload, now=1000.0)
    assert h[webhooks.DELIVERY_HEADER] == "end:t1"
    assert webhooks.verify(SECRET.encode(), "1000", payload, h[webhooks.SIGNATURE_HEADER])
    assert not webhooks.verify(SECRET.encode(), "1001", payload, h[webhooks.SIGNATURE_HEADER])
    assert not webhooks.verify(SECRET.encode(), "1000", payload + b" ", h[webhooks.SIGNATURE_HEADER])
    assert not webhooks.verify(b"another secret..", "1000", payload, h[webhooks.SIGNATURE_HEADER])


def test_retries_back_off_up_to_the_maximum() -> None:
    hook = Webhook(name="ops", url="https://x.test", retry_base_s=2, retry_max_s=30)
    assert [webhooks.retry_delay(hook, n) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
