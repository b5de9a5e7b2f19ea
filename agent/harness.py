"""`sled harness`: N daemons as separate OS processes on 127.0.0.1, for trying and testing a
cluster on one machine.

`up` picks free ports, makes a random cluster key (given to the daemons in their environment,
never on a command line or in a log), starts `sled run` processes with zeroconf on loopback and
per-node logs in the state directory, writes the state file (mode 0600: it holds the key, so
that `add` can start more nodes of the same cluster), and returns once every node sees all the
others alive with the same plan epoch (and, with a model, once a node has it loaded).
`status` reads the state file and each node's /status; `down` sends SIGTERM to the processes
it started and SIGKILL to those still running after a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.config import FIELDS
from agent.status_cli import StatusError, fetch_status, format_table
from transport.auth import ENV_KEY

POLL_S = 0.2
SETTABLE = frozenset(f.name for f in FIELDS if f.flag)


class HarnessError(Exception):
    """The harness could not start, find or stop its nodes; the text says why."""


@dataclass(frozen=True)
class NodeProcess:
    name: str
    pid: int
    api: str
    peer_port: int
    log: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HarnessState:
    directory: str
    cluster_key: str = field(repr=False)
    nodes: tuple[NodeProcess, ...] = ()
    model: str | None = None
    common: dict[str, str] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The state without the key (what `--json` prints)."""
        out = asdict(self)
        del out["cluster_key"]
        out["nodes"] = [asdict(n) for n in self.nodes]
        return out


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sled" / "harness" / "state.json"


def write_state(path: Path, state: HarnessState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(state), handle, indent=1)
    os.replace(tmp, path)


def read_state(path: Path) -> HarnessState:
    try:
        data = json.loads(path.read_text())
        nodes = tuple(NodeProcess(**n) for n in data.pop("nodes"))
        return HarnessState(nodes=nodes, **data)
    except FileNotFoundError:
        raise HarnessError(
            f"no harness state at {path} (start one with `sled harness up`)"
        ) from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise HarnessError(f"harness state {path} is unreadable: {exc}") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_assignments(items: Sequence[str], where: str) -> dict[str, str]:
    """KEY=VALUE items (config keys, dashes or underscores)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SETTABLE:
            raise HarnessError(
                f"{where} {item!r}: expected KEY=VALUE with KEY a config key "
                f"({', '.join(sorted(SETTABLE))})"
            )
        out[key] = value
    return out


def per_node_options(
    n: int, lists: Mapping[str, str | None], node_sets: Sequence[str]
) -> list[dict[str, str]]:
    """Options of each node: comma lists (one value per node, or one for all) and `I:KEY=VALUE`
    items for single nodes."""
    options: list[dict[str, str]] = [{} for _ in range(n)]
    for key, text in lists.items():
        if text is None:
            continue
        values = [v.strip() for v in text.split(",")]
        if len(values) not in (1, n):
            raise HarnessError(f"--{key.replace('_', '-')}: give 1 or {n} values, got {text!r}")
        for i in range(n):
            options[i][key] = values[0] if len(values) == 1 else values[i]
    for item in node_sets:
        index, sep, rest = item.partition(":")
        if not sep or not index.isdigit() or not 0 <= int(index) < n:
            raise HarnessError(f"--node-set {item!r}: expected I:KEY=VALUE with I in 0..{n - 1}")
        options[int(index)].update(parse_assignments([rest], "--node-set"))
    return options


def _alive(pid: int) -> bool:
    """Whether pid is one of our `sled run` processes (not exited, not a recycled pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False  # exited, not yet reaped
    if cmdline == [b""]:
        return True  # just started: the kernel fills cmdline in at exec
    return b"agent.cli" in cmdline and b"run" in cmdline


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Harness:
    """Starting, watching and stopping harness nodes."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path

    def spawn(
        self,
        directory: Path,
        key: str,
        name: str,
        options: Mapping[str, str],
        bootstrap: str | None,
    ) -> tuple[NodeProcess, Path]:
        peer_port, api_port = free_port(), free_port()
        ready = directory / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = directory / f"{name}.log"
        flags = {
            "name": name,
            "peer_host": "127.0.0.1",
            "peer_port": str(peer_port),
            "api_host": "127.0.0.1",
            "api_port": str(api_port),
            "interfaces": "127.0.0.1",
            **({"peers": bootstrap} if bootstrap else {}),
            **options,
        }
        argv = [sys.executable, "-m", "agent.cli", "run", "--ready-file", str(ready)]
        for key_name, value in flags.items():
            argv += ["--" + key_name.replace("_", "-"), value]
        env = {k: v for k, v in os.environ.items() if k != "SLED_CLUSTER_KEY_FILE"}
        env[ENV_KEY] = key
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(Path(__file__).resolve().parent.parent),
                start_new_session=True,  # outlives `up`; Ctrl-C in the shell does not reach it
            )
        node = NodeProcess(
            name, proc.pid, f"http://127.0.0.1:{api_port}", peer_port, str(log_path), dict(options)
        )
        return node, ready

    def up(
        self,
        n: int,
        model: str | None,
        common: Mapping[str, str],
        options: Sequence[Mapping[str, str]],
        timeout: float,
        wait_model: bool = True,
    ) -> HarnessState:
        if n < 1:
            raise HarnessError("-n must be >= 1")
        if self.state_path.exists():
            try:
                old = read_state(self.state_path)
            except HarnessError:
                old = None
            if old is not None and any(_alive(p.pid) for p in old.nodes):
                raise HarnessError(
                    f"a harness is already running ({self.state_path}); "
                    "stop it with `sled harness down` or pass another --state"
                )
        directory = self.state_path.parent
        directory.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(16)
        base = {**({"models": model} if model else {}), **common}
        nodes: list[NodeProcess] = []
        readies: list[Path] = []
        bootstrap: str | None = None
        for i in range(n):
            node, ready = self.spawn(directory, key, f"node-{i}", {**base, **options[i]}, bootstrap)
            bootstrap = bootstrap or f"127.0.0.1:{node.peer_port}"
            nodes.append(node)
            readies.append(ready)
        state = HarnessState(str(directory), key, tuple(nodes), model, dict(common))
        write_state(self.state_path, state)
        try:
            wait_until_ready(nodes, readies, timeout)
            wait_for_cluster(nodes, timeout, model if wait_model else None)
        except HarnessError:
            self.down(timeout=5.0)
            raise
        return state

    def add(self, options: Mapping[str, str], timeout: float) -> NodeProcess:
        """Start one more node in the running harness."""
        state = read_state(self.state_path)
        directory = Path(state.directory)
        alive = [p for p in state.nodes if _alive(p.pid)]
        bootstrap = f"127.0.0.1:{alive[0].peer_port}" if alive else None
        base = {**({"models": state.model} if state.model else {}), **state.common}
        name = f"node-{len(state.nodes)}"
        node, ready = self.spawn(directory, state.cluster_key, name, {**base, **options}, bootstrap)
        state = HarnessState(
            state.directory,
            state.cluster_key,
            (*state.nodes, node),
            state.model,
            state.common,
        )
        write_state(self.state_path, state)
        wait_until_ready([node], [ready], timeout)
        return node

    def down(self, timeout: float = 30.0) -> list[tuple[str, str]]:
        """SIGTERM every node still running, SIGKILL after `timeout`; [(name, how it ended)]."""
        state = read_state(self.state_path)
        running = [p for p in state.nodes if _alive(p.pid)]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(p.pid) for p in running) and time.monotonic() < deadline:
            _reap()
            time.sleep(POLL_S)
        outcome = []
        for proc in state.nodes:
            if proc not in running:
                outcome.append((proc.name, "not running"))
            elif _alive(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                outcome.append((proc.name, "killed (SIGKILL)"))
            else:
                outcome.append((proc.name, "stopped"))
        _reap()
        return outcome


def _reap() -> None:
    """Collect exited children of this process (when `up` and `down` ran in one process)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def wait_until_ready(nodes: Sequence[NodeProcess], readies: Sequence[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(zip([n.name for n in nodes], readies, strict=True))
    by_name = {n.name: n for n in nodes}
    while pending:
        for name, ready in list(pending.items()):
            if ready.exists():
                del pending[name]
            elif not _alive(by_name[name].pid):
                _reap()
                raise HarnessError(
                    f"{name} exited during start; its log ({by_name[name].log}) ends:\n"
                    + log_tail(by_name[name].log)
                )
        if pending and time.monotonic() > deadline:
            raise HarnessError(f"{', '.join(pending)} not ready after {timeout:.0f} s")
        if pending:
            time.sleep(POLL_S)


def cluster_agrees(statuses: Mapping[str, Mapping[str, Any]], model: str | None) -> bool:
    """Every node sees every other alive, all report the same epoch and digest, and (with a
    model) some node has it loaded."""
    names = set(statuses)
    for name, status in statuses.items():
        alive = {p["name"] for p in status.get("peers", []) if p.get("alive")}
        if alive != names - {name}:
            return False
    if len({(s.get("epoch"), s.get("digest")) for s in statuses.values()}) != 1:
        return False
    if model is not None:
        from agent.probe import model_name

        return any(model_name(model) in s.get("loaded", []) for s in statuses.values())
    return True


def poll_statuses(nodes: Sequence[NodeProcess]) -> dict[str, dict[str, Any]]:
    out = {}
    for node in nodes:
        with contextlib.suppress(StatusError):
            out[node.name] = fetch_status(node.api, timeout=2.0)
    return out


def wait_for_cluster(nodes: Sequence[NodeProcess], timeout: float, model: str | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = poll_statuses(nodes)
        if len(statuses) == len(nodes) and cluster_agrees(statuses, model):
            return
        if time.monotonic() > deadline:
            seen = {
                n: sorted(p["name"] for p in s["peers"] if p["alive"]) for n, s in statuses.items()
            }
            raise HarnessError(
                f"the nodes did not agree within {timeout:.0f} s (each node's alive peers: {seen})"
            )
        time.sleep(POLL_S)


# -- commands ----------------------------------------------------------------------------------


def wait_for_drafters(
    nodes: Sequence[NodeProcess], model: str, drafters: Sequence[str], timeout: float
) -> None:
    """Until every node's plan names these drafter nodes for the model (a drafter loads its
    drafter after it joins, then advertises it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        plans = [s.get("plan", {}) for s in poll_statuses(nodes).values()]
        if plans and all(set(drafters) <= set(p.get("drafters", {}).get(model, [])) for p in plans):
            return
        time.sleep(POLL_S)
    raise HarnessError(
        f"{', '.join(drafters)} did not start drafting for {model} in {timeout:.0f} s"
    )


def _print_nodes(state: HarnessState, statuses: Mapping[str, Mapping[str, Any]]) -> None:
    rows = []
    for node in state.nodes:
        status = statuses.get(node.name)
        running = _alive(node.pid)
        rows.append(
            (
                node.name,
                node.api,
                str(node.pid),
                "running" if running else "stopped",
                ", ".join(status.get("roles", [])) if status else "-",
                ", ".join(status.get("loaded", [])) or "-" if status else "-",
                str(status.get("epoch")) if status else "-",
            )
        )
    header = ("NODE", "API", "PID", "PROCESS", "ROLES", "LOADED", "EPOCH")
    print(format_table(rows, header))
    print(f"\nlogs and state: {state.directory}")


def cmd_up(args: Any) -> int:
    harness = Harness(Path(args.state) if args.state else default_state_path())
    try:
        common = parse_assignments(args.set, "--set")
        for key in ("weights", "backend", "threads", "replicas", "max_len", "max_sessions"):
            value = getattr(args, key, None)
            if value is not None:
                common[key] = str(value)
        options = per_node_options(
            args.n,
            {"memory_budget": args.memory_budget, "role": args.role},
            args.node_set,
        )
        state = harness.up(
            args.n, args.model, common, options, args.timeout, wait_model=not args.no_wait_model
        )
    except HarnessError as exc:
        print(f"sled harness up: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**state.public(), "state_file": str(harness.state_path)}))
    else:
        for node in state.nodes:
            print(f"{node.name}  {node.api}  (pid {node.pid}, log {node.log})")
    return 0


def cmd_add(args: Any) -> int:
    harness = Harness(Path(args.state) if args.state else default_state_path())
    try:
        options = parse_assignments(args.set, "--set")
        node = harness.add(options, args.timeout)
    except HarnessError as exc:
        print(f"sled harness add: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(node)) if args.json else f"{node.name}  {node.api}  (pid {node.pid})")
    return 0


def cmd_status(args: Any) -> int:
    path = Path(args.state) if args.state else default_state_path()
    try:
        state = read_state(path)
    except HarnessError as exc:
        print(f"sled harness status: {exc}", file=sys.stderr)
        return 1
    statuses = poll_statuses([n for n in state.nodes if _alive(n.pid)])
    if args.json:
        nodes = [
            {**asdict(n), "running": _alive(n.pid), "status": statuses.get(n.name)}
            for n in state.nodes
        ]
        print(json.dumps({**state.public(), "nodes": nodes}))
    else:
        _print_nodes(state, statuses)
    return 0


def cmd_down(args: Any) -> int:
    harness = Harness(Path(args.state) if args.state else default_state_path())
    try:
        outcome = harness.down(args.timeout)
    except HarnessError as exc:
        print(f"sled harness down: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"nodes": [{"name": n, "result": r} for n, r in outcome]}))
    else:
        for name, result in outcome:
            print(f"{name}: {result}")
    return 0
