"""The local stack behind `taskerman dev up|down|status`: servers, services and a demo fleet under one home.

Every process started is recorded in `$TASKERMAN_HOME/stack.json` (name, pid, command, and for runners
and demo services their cluster and node), so that `down` stops exactly what `up` started and a chaos
tool can find every pid.

`up --cluster-mode` runs the multi-node topology of compose/ on loopback instead of one server of each:
three clustered nats-servers and a three-server ZooKeeper ensemble (each member recorded as its own
`nats-server` / `zookeeper` process with its `member` index), every stream at 3 replicas. The record
keeps the servers' URLs, so the CLI finds them while `TASKERMAN_NATS_URL` / `TASKERMAN_ZK_HOSTS` are
unset (`with_stack_servers`)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from taskcore.bus.jetstream import REPLICAS_ENV
from taskcore.core.errors import ServerNotReady, TaskermanError
from taskcore.core.settings import Settings
from taskcore.runtime import procs
from taskerman_dev import demo_fleet
from taskerman_dev.launchers import (
    NatsCluster,
    NatsServer,
    ZooKeeperEnsemble,
    ZooKeeperServer,
    free_port,
    port_open,
)

CLUSTER = "demo:web"
STACK_FILE = "stack.json"
SERVICE_BASE_PORT = 18080
CANARY_EVERY = 10  # seconds between the scheduler's taskerman:ping tasks to the demo cluster
STOP_TIMEOUT = 10.0
SETTLE_S = 1.0
NATS_READY_S = 30.0
ZK_READY_S = 60.0
HEALTH_READY_S = 15.0
CLUSTER_SIZE = 3  # --cluster-mode: nats-servers, ZooKeeper servers, and so stream replicas
# The order `down` stops things in: workers first, so nothing acts on a fleet that is going away.
STOP_ORDER = (("runner",), ("router", "scheduler"), ("demo-service",), ("nats-server", "zookeeper"))


class StackProcess(msgspec.Struct, kw_only=True):
    """One process the stack started."""

    name: str
    pid: int
    command: list[str]
    cluster: str | None = None
    node: str | None = None
    member: int | None = None  # cluster mode: the server's place (1-based) in the stack's nats_url / zk_hosts
    log: str | None = None
    state_dir: str | None = None  # demo services: their pidfile lives here (their pid changes on restart)
    start_ticks: int | None = None  # tells the recorded pid from a later reuse of the same number
    started_at: float = 0.0


class Stack(msgspec.Struct, kw_only=True):
    """The contents of `stack.json`."""

    home: str
    nats_url: str  # every server's URL, comma-separated (the form of TASKERMAN_NATS_URL)
    zk_hosts: str
    created_at: float
    cluster_mode: bool = False
    processes: list[StackProcess] = []


class StackError(TaskermanError):
    """Starting the stack failed; the message says what and where to look."""


# --- the record ------------------------------------------------------------------------------------------


def _absolute(settings: Settings) -> Settings:
    """The settings with `home` made absolute, so every child agrees on it."""
    return msgspec.structs.replace(settings, home=settings.home.resolve())


def stack_path(settings: Settings) -> Path:
    """Where the stack's record lives."""
    return settings.home / STACK_FILE


def load_stack(settings: Settings) -> Stack | None:
    """The recorded stack, or None when there is none (an unreadable record is reported and ignored)."""
    path = stack_path(settings)
    try:
        return msgspec.json.decode(path.read_bytes(), type=Stack)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        print(f"taskerman dev: ignoring unreadable {path}: {e}", file=sys.stderr)
        return None


def _save(settings: Settings, stack: Stack) -> None:
    """Write the record atomically."""
    path = stack_path(settings)
    tmp = path.with_name(f".{STACK_FILE}.{os.getpid()}")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(stack)) + b"\n")
    tmp.replace(path)


def current_pid(proc: StackProcess) -> int:
    """The process's pid now: a demo service's comes from its pidfile, since a restart changes it."""
    if proc.state_dir is not None:
        pid = demo_fleet.read_pid(Path(proc.state_dir))
        if pid is not None:
            return pid
    return proc.pid


def is_alive(proc: StackProcess) -> bool:
    """Whether the recorded process (not some later one that reuses its pid) still runs."""
    if proc.state_dir is not None and demo_fleet.read_pid(Path(proc.state_dir)) is not None:
        return True
    return _recorded_alive(proc)


def _recorded_alive(proc: StackProcess) -> bool:
    """Whether the pid recorded at start still runs as the same process."""
    return procs.alive(proc.pid, proc.start_ticks)


def is_running(settings: Settings) -> bool:
    """Whether any process of the recorded stack still runs."""
    stack = load_stack(_absolute(settings))
    return stack is not None and any(is_alive(p) for p in stack.processes)


def with_stack_servers(settings: Settings, env: Mapping[str, str]) -> Settings:
    """The settings with the running stack's NATS URLs and ZooKeeper hosts wherever `env` leaves
    `TASKERMAN_NATS_URL` / `TASKERMAN_ZK_HOSTS` unset, so the CLI reaches a `dev up --cluster-mode`
    stack (or one on non-default ports) without exports; unchanged when no stack runs under home."""
    if not stack_path(settings).is_file():
        return settings
    stack = load_stack(settings)
    if stack is None or not any(is_alive(p) for p in stack.processes):
        return settings
    return msgspec.structs.replace(
        settings,
        nats_url=env.get("TASKERMAN_NATS_URL", stack.nats_url),
        zk_hosts=env.get("TASKERMAN_ZK_HOSTS", stack.zk_hosts),
    )


# --- up --------------------------------------------------------------------------------------------------


def _nats_addresses(url: str) -> list[tuple[str, int]]:
    """Host and port of every NATS URL in the comma-separated list."""
    found = []
    for item in url.split(","):
        parts = urllib.parse.urlsplit(item.strip() if "://" in item else f"nats://{item.strip()}")
        found.append((parts.hostname or "127.0.0.1", parts.port or 4222))
    return found


def _zk_addresses(hosts: str) -> list[tuple[str, int]]:
    """Host and port of every ZooKeeper host in the comma-separated list, ignoring any chroot."""
    found = []
    for item in hosts.partition("/")[0].split(","):
        host, _, port = item.strip().rpartition(":")
        if port.isdigit():
            found.append((host.strip("[]") or "127.0.0.1", int(port)))
        else:
            found.append((item.strip() or "127.0.0.1", 2181))
    return found


def _nats_listen(url: str) -> tuple[str, int]:
    """Host and port to listen on, from the (first) NATS URL."""
    return _nats_addresses(url)[0]


def _zk_listen(hosts: str) -> tuple[str, int]:
    """Host and port to listen on, from the (first) ZooKeeper host, ignoring any chroot."""
    return _zk_addresses(hosts)[0]


def _member_ports(what: str, addresses: list[tuple[str, int]]) -> tuple[str, list[int]]:
    """The host and client ports of a cluster's members: the addresses when the setting names exactly
    CLUSTER_SIZE on one host (as `dev up --cluster-mode` prints them), else consecutive ports from the
    first (4222-4224 from the default)."""
    host, first = addresses[0]
    if len(addresses) == CLUSTER_SIZE:
        if {h for h, _ in addresses} != {host}:
            raise StackError(f"the {what} servers of --cluster-mode must share one host, not {addresses}")
        return host, [port for _, port in addresses]
    if first + CLUSTER_SIZE - 1 > 65535:
        raise StackError(f"no {CLUSTER_SIZE} {what} ports from {first} on")
    return host, [first + i for i in range(CLUSTER_SIZE)]


def _server_groups(settings: Settings) -> tuple[NatsCluster, ZooKeeperEnsemble]:
    """The NATS cluster and ZooKeeper ensemble of cluster mode, on the ports the settings name (their
    route, monitoring, quorum and election ports are free ones); data kept under home across restarts."""
    nats_host, nats_ports = _member_ports("NATS", _nats_addresses(settings.nats_url))
    zk_host, zk_ports = _member_ports("ZooKeeper", _zk_addresses(settings.zk_hosts))
    home = settings.home
    return (
        NatsCluster(home / "nats-cluster", size=CLUSTER_SIZE, host=nats_host, ports=nats_ports),
        ZooKeeperEnsemble(home / "zookeeper-ensemble", size=CLUSTER_SIZE, host=zk_host, ports=zk_ports),
    )


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; non-ASCII stays literal)."""
    return json.dumps(value, ensure_ascii=False)


def _script(name: str) -> Path:
    """A console script installed next to this interpreter (the venv's bin/)."""
    path = Path(sys.executable).parent / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise StackError(f"{path} not found: install Taskerman into this environment (`make install`)")
    return path


def _service_port(node_index: int, taken: set[int]) -> int:
    """18080+i when free, else any free port."""
    port = SERVICE_BASE_PORT + node_index
    if port in taken or port_open("127.0.0.1", port, timeout=0.2):
        port = free_port()
    taken.add(port)
    return port


def _log_tail(path: str | None, lines: int = 15) -> str:
    """The end of a log file, indented."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"    (no log at {path})"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])


class _Starter:
    """Starts the stack's processes one by one, recording each in stack.json as soon as it exists."""

    def __init__(
        self, settings: Settings, runners: int, groups: tuple[NatsCluster, ZooKeeperEnsemble] | None = None
    ) -> None:
        self.groups = groups
        if groups is not None:  # cluster mode: every service is given every server
            chroot = settings.zk_hosts.partition("/")[1:]
            settings = msgspec.structs.replace(
                settings, nats_url=groups[0].urls, zk_hosts=groups[1].hosts + "".join(chroot)
            )
        self.settings = settings
        self.home = settings.home
        self.runners = runners
        self.env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}
        if groups is not None:
            self.env[REPLICAS_ENV] = str(CLUSTER_SIZE)
        self.stack = Stack(
            home=str(self.home),
            nats_url=settings.nats_url,
            zk_hosts=settings.zk_hosts,
            created_at=time.time(),
            cluster_mode=groups is not None,
        )

    def record(self, proc: StackProcess) -> None:
        """Add a started process to the record."""
        proc.start_ticks = procs.start_ticks(proc.pid)
        proc.started_at = time.time()
        self.stack.processes.append(proc)
        _save(self.settings, self.stack)
        where = f"  {proc.cluster} {proc.node}" if proc.node else ""
        print(f"  {_display_name(proc.name, proc.member):<13} pid {proc.pid:<8}{where}", flush=True)

    def servers(self) -> None:
        """NATS and ZooKeeper on the ports the settings name; data kept under home across restarts."""
        if self.groups is not None:
            self.cluster_servers(*self.groups)
            return
        nats_host, nats_port = _nats_listen(self.settings.nats_url)
        zk_host, zk_port = _zk_listen(self.settings.zk_hosts)
        for what, host, port in (("NATS", nats_host, nats_port), ("ZooKeeper", zk_host, zk_port)):
            if port_open(host, port):
                raise StackError(f"{what} port {host}:{port} is already in use (another stack or server?)")
        nats = NatsServer(self.home / "nats", port=nats_port, host=nats_host)
        zk = ZooKeeperServer(self.home / "zookeeper", port=zk_port, host=zk_host)
        for name, server in (("nats-server", nats), ("zookeeper", zk)):
            server.start()
            self.record(
                StackProcess(
                    name=name,
                    pid=server.pid,
                    command=procs.cmdline(server.pid) or [],
                    log=str(server.log_path),
                )
            )
        try:
            nats.wait_ready(NATS_READY_S)
            zk.wait_ready(ZK_READY_S)
        except ServerNotReady as e:
            raise StackError(str(e)) from e

    def cluster_servers(self, nats: NatsCluster, zk: ZooKeeperEnsemble) -> None:
        """Every member of both groups started and recorded, then both groups ready (a JetStream meta
        leader all nats-servers agree on; one ZooKeeper leader, the others following)."""
        for what, members in (("NATS", nats.servers), ("ZooKeeper", zk.servers)):
            for server in members:
                if port_open(server.host, server.port):
                    where = f"{server.host}:{server.port}"
                    raise StackError(f"{what} port {where} is already in use (another stack or server?)")
        try:
            for name, group in (("nats-server", nats), ("zookeeper", zk)):
                for i, member in enumerate(group.servers, start=1):
                    member.start()
                    self.record(
                        StackProcess(
                            name=name,
                            pid=member.pid,
                            command=procs.cmdline(member.pid) or [],
                            member=i,
                            log=str(member.log_path),
                        )
                    )
            nats.wait_ready(NATS_READY_S)
            zk.wait_ready(ZK_READY_S)
        except ServerNotReady as e:
            raise StackError(str(e)) from e

    def fleet(self) -> list[tuple[str, Path, int]]:
        """Write the inventory and node configs, start each node's demo service; (node, config, port)."""
        nodes = [f"node-{i}" for i in range(1, self.runners + 1)]
        inventory = self.home / "inventory.toml"
        node_list = ", ".join(_toml_str(n) for n in nodes)
        inventory.write_text(f"[clusters.{_toml_str(CLUSTER)}]\nnodes = [{node_list}]\n")
        fleet, taken = [], set[int]()
        for i, node in enumerate(nodes, start=1):
            state_dir = self.home / "nodes" / node
            port = _service_port(i, taken)
            config = self.home / "nodes" / f"{node}.toml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(
                f"cluster = {_toml_str(CLUSTER)}\n"
                f"node = {_toml_str(node)}\n\n"
                f"[packs.{demo_fleet.PACK}]\n"
                f"port = {port}\n"
                f"state_dir = {_toml_str(str(state_dir))}\n"
            )
            pid = demo_fleet.start_service(port, state_dir, node)
            self.record(
                StackProcess(
                    name="demo-service",
                    pid=pid,
                    command=demo_fleet.service_command(port, state_dir, node),
                    cluster=CLUSTER,
                    node=node,
                    log=str(state_dir / demo_fleet.LOGFILE),
                    state_dir=str(state_dir),
                )
            )
            fleet.append((node, config, port))
        return fleet

    def spawn(self, name: str, argv: list[str], node: str | None = None) -> None:
        """Start one service process in the background, its log under home/logs/."""
        log = self.home / "logs" / (f"{name}-{node}.log" if node else f"{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} taskerman dev up: {' '.join(argv)}\n")
        pid = demo_fleet.spawn_detached(argv, log, env=self.env)
        cluster = CLUSTER if node else None
        self.record(StackProcess(name=name, pid=pid, command=argv, cluster=cluster, node=node, log=str(log)))

    def services(self, fleet: list[tuple[str, Path, int]]) -> None:
        """The router (static discovery from the inventory), the scheduler (pinging the demo cluster
        as its heartbeat canary), and one runner per node."""
        self.spawn(
            "router", [str(_script("taskerman-router")), "--inventory", str(self.home / "inventory.toml")]
        )
        canary = ["--canary-cluster", CLUSTER, "--canary-every", str(CANARY_EVERY)]
        self.spawn("scheduler", [str(_script("taskerman-scheduler")), *canary])
        for node, config, _ in fleet:
            self.spawn("runner", [str(_script("taskerman-runner")), "--config", str(config)], node=node)

    def settle(self, fleet: list[tuple[str, Path, int]]) -> None:
        """Every demo service answers its health check and every process is still alive after a moment."""
        deadline = time.monotonic() + HEALTH_READY_S
        for node, _, port in fleet:
            while not _healthy(port):
                if time.monotonic() > deadline:
                    raise StackError(f"the demo service of {node} does not answer on port {port}")
                time.sleep(0.1)
        time.sleep(SETTLE_S)
        dead = [p for p in self.stack.processes if not is_alive(p)]
        if dead:
            lines = [
                f"{p.name} {p.node or ''} (pid {p.pid}) exited; {p.log}:\n{_log_tail(p.log)}" for p in dead
            ]
            raise StackError("\n".join(lines))


def _healthy(port: int) -> bool:
    """Whether a demo service answers `GET /health` on the port."""
    try:
        with urllib.request.urlopen(f"http://{demo_fleet.HOST}:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def up(settings: Settings, runners: int = 4, cluster_mode: bool = False) -> int:
    """Start NATS, ZooKeeper, the demo fleet, router, scheduler and one runner per node in the background;
    with `cluster_mode`, three clustered nats-servers and a three-server ZooKeeper ensemble instead of one
    of each, and the services' streams at 3 replicas."""
    settings = _absolute(settings)
    if runners < 1:
        print("taskerman dev up: --runners must be at least 1", file=sys.stderr)
        return 1
    try:
        groups = _server_groups(settings) if cluster_mode else None
    except StackError as e:
        print(f"taskerman dev up: {e}", file=sys.stderr)
        return 1
    old = load_stack(settings)
    if old is not None:
        alive = [p for p in old.processes if is_alive(p)]
        if alive:
            print(
                f"taskerman dev up: a stack is already running under {settings.home} "
                f"({len(alive)} of {len(old.processes)} processes alive); "
                "see `taskerman dev status`, or stop it with `taskerman dev down`",
                file=sys.stderr,
            )
            return 1
        print(f"replacing the stale record {stack_path(settings)} (none of its processes runs)")
    settings.home.mkdir(parents=True, exist_ok=True)
    starter = _Starter(settings, runners, groups)
    settings = starter.settings
    print(f"starting the stack under {settings.home}" + (" in cluster mode" if cluster_mode else ""))
    try:
        for name in ("taskerman-router", "taskerman-scheduler", "taskerman-runner"):
            _script(name)
        starter.servers()
        fleet = starter.fleet()
        starter.services(fleet)
        starter.settle(fleet)
    except (StackError, OSError) as e:
        print(f"taskerman dev up: {e}", file=sys.stderr)
        if starter.stack.processes:
            print("stopping what was started", file=sys.stderr)
            down(settings)
        return 1
    except BaseException:
        if starter.stack.processes:
            down(settings)
        raise
    print(
        f"stack up: NATS {settings.nats_url}, ZooKeeper {settings.zk_hosts}, "
        f"cluster {CLUSTER} with {runners} nodes; logs under {settings.home / 'logs'}"
    )
    if cluster_mode:
        print(
            f"streams at {CLUSTER_SIZE} replicas. The taskerman CLI uses these servers while "
            f"TASKERMAN_NATS_URL and TASKERMAN_ZK_HOSTS are unset and TASKERMAN_HOME is {settings.home};"
            " anywhere else:\n"
            f"  export TASKERMAN_NATS_URL={shlex.quote(settings.nats_url)}\n"
            f"  export TASKERMAN_ZK_HOSTS={shlex.quote(settings.zk_hosts)}"
        )
    return 0


# --- down ------------------------------------------------------------------------------------------------


def _stop_rank(proc: StackProcess) -> int:
    """Position of the process in the stopping order (unknown names go with the router)."""
    return next((i for i, names in enumerate(STOP_ORDER) if proc.name in names), 1)


def _pids_of(proc: StackProcess) -> list[int]:
    """The live pids that belong to a recorded process (a demo service: its pidfile's and the original)."""
    pids = []
    if proc.state_dir is not None and (pid := demo_fleet.read_pid(Path(proc.state_dir))) is not None:
        pids.append(pid)
    if _recorded_alive(proc) and proc.pid not in pids:
        pids.append(proc.pid)
    return pids


def down(settings: Settings) -> int:
    """Stop everything the recorded stack started, in order; SIGTERM, then SIGKILL after a deadline."""
    settings = _absolute(settings)
    stack = load_stack(settings)
    if stack is None:
        print(f"no stack recorded under {settings.home}: nothing to stop")
        return 0
    stopped = killed = 0
    for rank in range(len(STOP_ORDER)):
        group = [p for p in stack.processes if _stop_rank(p) == rank]
        pids = [pid for p in group for pid in _pids_of(p)]
        if pids:
            killed += len(procs.terminate(pids, STOP_TIMEOUT))
            stopped += len(pids)
            print(f"  stopped {', '.join(sorted({p.name for p in group}))} ({len(pids)})", flush=True)
        for p in group:
            if p.state_dir is not None:
                demo_fleet.stop_service(Path(p.state_dir), timeout=1.0)  # clears a pidfile left by a kill
    stack_path(settings).unlink(missing_ok=True)
    if stopped:
        print(
            f"stack under {settings.home} stopped ({stopped} processes"
            + (f", {killed} killed)" if killed else ")")
        )
    else:
        print(f"nothing was running under {settings.home}; removed the stale record")
    return 0


# --- status ----------------------------------------------------------------------------------------------


def status(settings: Settings, as_json: bool) -> int:
    """Every recorded process with its pid and whether it runs; 0 when all run, 1 otherwise."""
    settings = _absolute(settings)
    stack = load_stack(settings)
    procs = stack.processes if stack is not None else []
    rows: list[dict[str, object]] = [
        {
            "name": p.name,
            "pid": current_pid(p),
            "alive": is_alive(p),
            "cluster": p.cluster,
            "node": p.node,
            "member": p.member,
        }
        for p in procs
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif stack is not None and rows:
        mode = f" (cluster mode, streams at {CLUSTER_SIZE} replicas)" if stack.cluster_mode else ""
        print(f"NATS {stack.nats_url}  ZooKeeper {stack.zk_hosts}{mode}")
        _print_table(rows)
    else:
        print(f"no stack recorded under {settings.home}")
    return 0 if rows and all(r["alive"] for r in rows) else 1


def _display_name(name: object, member: object) -> str:
    """The name, with a cluster member's index (`nats-server-2`)."""
    return f"{name}-{member}" if member is not None else str(name)


def _print_table(rows: Sequence[dict[str, object]]) -> None:
    """The rows as an aligned table."""
    print(f"{'NAME':<13} {'PID':>8}  {'ALIVE':<5}  {'CLUSTER':<10} NODE")
    for r in rows:
        alive = "yes" if r["alive"] else "no"
        name = _display_name(r["name"], r["member"])
        print(f"{name:<13} {r['pid']!s:>8}  {alive:<5}  {r['cluster'] or '-'!s:<10} {r['node'] or '-'}")
