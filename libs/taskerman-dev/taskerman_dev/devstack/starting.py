"""`taskerman dev up`: the servers, the demo fleet and the services, each recorded as soon as it runs."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

from taskcore.bus.jetstream import REPLICAS_ENV
from taskcore.core.errors import ServerNotReady
from taskcore.core.settings import Settings
from taskcore.runtime import procs
from taskerman_dev import demo_fleet, secrets
from taskerman_dev.devstack.addresses import nats_listen, server_groups, zk_listen
from taskerman_dev.devstack.record import (
    CLUSTER,
    CLUSTER_SIZE,
    Stack,
    StackError,
    StackProcess,
    absolute,
    display_name,
    is_alive,
    load_stack,
    save,
    stack_path,
)
from taskerman_dev.devstack.stopping import down
from taskerman_dev.launchers import (
    NatsCluster,
    NatsServer,
    ZooKeeperEnsemble,
    ZooKeeperServer,
    free_port,
    port_open,
)

SERVICE_BASE_PORT = 18080
CANARY_EVERY = 10  # seconds between the scheduler's taskerman:ping tasks to the demo cluster
SETTLE_S = 1.0
NATS_READY_S = 30.0
ZK_READY_S = 60.0
HEALTH_READY_S = 15.0


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
            admin_seed_file=str(settings.admin_seed_file) if settings.admin_seed_file else None,
            nats_creds=str(settings.nats_creds) if settings.nats_creds else None,
            zk_auth=str(settings.zk_auth) if settings.zk_auth else None,
            zk_acl=list(settings.zk_acl),
        )

    def record(self, proc: StackProcess) -> None:
        """Add a started process to the record."""
        proc.start_ticks = procs.start_ticks(proc.pid)
        proc.started_at = time.time()
        self.stack.processes.append(proc)
        save(self.settings, self.stack)
        where = f"  {proc.cluster} {proc.node}" if proc.node else ""
        print(f"  {display_name(proc.name, proc.member):<13} pid {proc.pid:<8}{where}", flush=True)

    def servers(self) -> None:
        """NATS and ZooKeeper on the ports the settings name; data kept under home across restarts."""
        if self.groups is not None:
            self.cluster_servers(*self.groups)
            return
        nats_host, nats_port = nats_listen(self.settings.nats_url)
        zk_host, zk_port = zk_listen(self.settings.zk_hosts)
        for what, host, port in (("NATS", nats_host, nats_port), ("ZooKeeper", zk_host, zk_port)):
            if port_open(host, port):
                raise StackError(f"{what} port {host}:{port} is already in use (another stack or server?)")
        nats = NatsServer(
            self.home / "nats", port=nats_port, host=nats_host, users=secrets.nats_users(self.home)
        )
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
        pid = demo_fleet.spawn_detached(argv, log, env=secrets.command_env(self.env, argv))
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
    settings = absolute(settings)
    if runners < 1:
        print("taskerman dev up: --runners must be at least 1", file=sys.stderr)
        return 1
    try:
        groups = server_groups(settings) if cluster_mode else None
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
    # signed work items (the stack's own router and admin keys, both trusted by its runners) and a
    # NATS user per role: each service connects as its own, the CLI on this machine as admin
    settings = msgspec.structs.replace(settings, **secrets.generate(settings.home))
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
