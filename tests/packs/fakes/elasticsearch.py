"""A small HTTP server answering the few Elasticsearch endpoints that the elasticsearch pack uses, with a
cluster whose nodes can be restarted, and a record of every call.

In a test: `with FakeElasticsearch(["es-1", "es-2", "es-3"]) as es: ...`; the pack's restart command is
`[sys.executable, __file__, "restart", es.url, NODE]` (what `systemctl restart elasticsearch` stands for).

Endpoints: GET /_cluster/health, GET /_cat/nodes?format=json&h=..., GET|PUT /_cluster/settings,
POST /_flush, and the fake's own POST /_fake/restart?node=NAME.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class FakeNode:
    name: str
    pid: int
    ip: str
    back_at: float | None = None  # while restarting: when it rejoins (None: it is up, or inf: never)


@dataclass
class ClusterState:
    nodes: dict[str, FakeNode]
    persistent: dict[str, Any] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    rejoin_after: float = 0.3  # seconds a restarted node stays away; float("inf"): it never rejoins
    stuck_status: str | None = None  # "red" / "yellow": health stays so whatever happens
    flush_failed_shards: int = 0
    next_pid: int = 1000


class FakeElasticsearch:
    """The fake cluster and its HTTP server (on a free port of 127.0.0.1, in a thread)."""

    def __init__(self, node_names: list[str]) -> None:
        self.lock = threading.Lock()
        nodes = {n: FakeNode(n, 100 + i, f"10.0.0.{i + 1}") for i, n in enumerate(node_names)}
        self.state = ClusterState(nodes=nodes)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    # --- the cluster model --------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for node in self.state.nodes.values():
            if node.back_at is not None and now >= node.back_at:
                node.back_at = None
                node.pid = self.state.next_pid
                self.state.next_pid += 1

    def present(self) -> list[FakeNode]:
        self._tick()
        return [n for n in self.state.nodes.values() if n.back_at is None]

    def allocation(self) -> str:
        return str(self.state.persistent.get("cluster.routing.allocation.enable") or "all")

    def health(self) -> dict[str, Any]:
        present = self.present()
        missing = len(self.state.nodes) - len(present)
        if self.state.stuck_status:
            status = self.state.stuck_status
        elif missing or self.allocation() != "all":
            # replicas of the missing node are unassigned; with allocation limited to primaries,
            # they stay so even once it is back
            status = "yellow" if missing or self.allocation() == "primaries" else "green"
        else:
            status = "green"
        unassigned = 0 if status == "green" else 5
        return {
            "cluster_name": "fake",
            "status": status,
            "timed_out": False,
            "number_of_nodes": len(present),
            "number_of_data_nodes": len(present),
            "active_primary_shards": 5,
            "active_shards": 10 - unassigned,
            "relocating_shards": 0,
            "initializing_shards": 0,
            "unassigned_shards": unassigned,
        }

    def restart(self, name: str) -> None:
        node = self.state.nodes[name]
        node.back_at = time.monotonic() + self.state.rejoin_after

    # --- HTTP ---------------------------------------------------------------------------------------

    def answer(self, method: str, raw_path: str, body: Any) -> tuple[int, Any]:
        parsed = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        path = parsed.path.rstrip("/") or "/"
        with self.lock:
            self.state.calls.append(Call(method, path, query, body))
            if (method, path) == ("GET", "/_cluster/health"):
                return 200, self.health()
            if (method, path) == ("GET", "/_cat/nodes"):
                if query.get("format") != "json":
                    return 400, {"error": "the pack must ask for format=json"}
                columns = query.get("h", "ip,name,pid").split(",")
                rows = [{"name": n.name, "pid": str(n.pid), "ip": n.ip} for n in self.present()]
                return 200, [{c: r.get(c) for c in columns} for r in rows]
            if path == "/_cluster/settings" and method == "GET":
                return 200, {"persistent": self.state.persistent, "transient": {}}
            if path == "/_cluster/settings" and method == "PUT":
                for key, value in (body or {}).get("persistent", {}).items():
                    if value is None:
                        self.state.persistent.pop(key, None)
                    else:
                        self.state.persistent[key] = value
                return 200, {"acknowledged": True, "persistent": body.get("persistent", {}), "transient": {}}
            if (method, path) == ("POST", "/_flush"):
                failed = self.state.flush_failed_shards
                return 200, {"_shards": {"total": 10, "successful": 10 - failed, "failed": failed}}
            if (method, path) == ("POST", "/_fake/restart"):
                name = query.get("node", "")
                if name not in self.state.nodes:
                    return 404, {"error": f"no node {name}"}
                self.restart(name)
                return 200, {"restarting": name}
        return 404, {"error": f"no handler for {method} {path}"}


def _handler(es: FakeElasticsearch) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else None
            status, answer = es.answer(self.command, self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main(argv: list[str]) -> int:
    """`python elasticsearch.py restart URL NODE`: what the node's restart command does, for the fake."""
    if len(argv) != 3 or argv[0] != "restart":
        print("usage: elasticsearch.py restart URL NODE", file=sys.stderr)
        return 2
    url = f"{argv[1]}/_fake/restart?node={urllib.parse.quote(argv[2])}"
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=5) as resp:
        return 0 if resp.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
