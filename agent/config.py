"""The daemon's configuration: one frozen dataclass from a TOML file, SLED_* variables and flags.

Precedence: built-in defaults < TOML file < environment (SLED_<KEY>) < command-line flags.
Every key is declared once in `FIELDS` (name, parser, help), which drives all three sources, so
an unknown key, a wrong type or a value out of range is refused with one clear sentence
(`ConfigError`) naming where it came from.

The cluster key is a secret: it comes from `SLED_CLUSTER_KEY`, the file's `cluster_key`, or a
file named by `cluster_key_file`, never from a flag (command lines are visible to every user
in `ps`), and it is never printed (`NodeConfig.__repr__` hides it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from transport.auth import ENV_KEY
from transport.discovery import parse_peer
from transport.errors import ConfigError as TransportConfigError

ROLES: Final = ("auto", "verifier", "drafter", "client")
BACKENDS: Final = ("torch", "onnx", "auto")
WEIGHTS: Final = ("auto", "fp32", "bf16", "int8", "int4")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEFAULT_MODEL: Final = "qwen2.5-coder-1.5b-instruct"
ENV_PREFIX: Final = "SLED_"
_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class ConfigError(ValueError):
    """An unusable configuration; the text says which key, where from, and what is expected."""


@dataclass(frozen=True)
class NodeConfig:
    """Everything `sled run` needs to know. Sizes in bytes, times in seconds."""

    name: str = field(default_factory=lambda: default_node_name())
    peer_host: str = "127.0.0.1"
    peer_port: int = 7070
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    cluster_key: str | None = field(default=None, repr=False)
    peers: tuple[str, ...] = ()  # static peers, host:port
    mdns: bool = True
    interfaces: tuple[str, ...] = ()  # zeroconf addresses; () = derived from peer_host
    models: tuple[str, ...] = (DEFAULT_MODEL,)  # models this node offers to hold
    memory_budget: int | None = None  # None: the memory available at start
    role: str = "auto"
    backend: str = "torch"
    # The GGUF's own 4-bit blocks on the VNNI kernel: the fastest format here both for decode and
    # for verify passes up to 16 sessions x 3 tokens (bench/speculative.py's cost table).
    weights: str = "int4"
    threads: int = 0  # 0: all cores
    max_sessions: int = 8  # KV-cache slots of a model this node holds
    max_queue: int = 16  # sessions waiting for a slot before requests get 429
    max_len: int = 2048  # tokens per session (prompt and reply)
    replicas: int = 2  # nodes that hold each model when enough can (failover without a reload)
    drafter: str = "ngram"  # what this node drafts with (see models.drafter_loading)
    speculative: bool = True  # a verifier here uses drafts (its own or drafter nodes')
    draft_k: int = 0  # draft tokens per verify step; 0: adaptive
    drafter_backend: str = "torch"
    drafter_weights: str = "int4"  # measured fastest for drafters here (bf16 ~1.5-1.8x slower)
    probe: bool = True  # measure decode/verify speed of offered models
    heartbeat: float = 0.5
    dead_after: float = 2.0
    shutdown_grace: float = 20.0  # how long SIGTERM waits for in-flight sessions
    api_max_body: int = 1 << 20
    api_max_sessions: int = 32  # concurrent generation requests the HTTP API admits
    log_level: str = "info"

    def __post_init__(self) -> None:
        check(self)

    @property
    def zeroconf_interfaces(self) -> list[str] | None:
        """Addresses zeroconf binds: the configured ones; else the peer address when it is one
        address (loopback stays on loopback); None (all) for a wildcard listener."""
        if self.interfaces:
            return list(self.interfaces)
        if self.peer_host in ("", "0.0.0.0", "::"):
            return None
        if self.peer_host in ("localhost", "::1") or self.peer_host.startswith("127."):
            return ["127.0.0.1"]
        return [self.peer_host]

    @property
    def static_peers(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_peer(p) for p in self.peers)


def default_node_name() -> str:
    """The host name, reduced to the characters a node id allows."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-.") or "sled"
    return name[:63]


# -- value parsers: each takes a TOML value or a string (env/flag) and returns the typed value --


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _integer(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _string_list(value: object) -> tuple[str, ...]:
    """A TOML array of strings, or a comma-separated string."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    raise ValueError(f"expected a list of strings, got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like 512M, 1.5G, 2GiB, 800MB (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            unit = (match.group(2) or "").lower()[:1]
            return int(float(match.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size such as 512M or 2G, got {value!r}")


def _optional_size(value: object) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("", "auto", "none"):
        return None
    return parse_size(value)


def _optional_text(value: object) -> str | None:
    text = _text(value)
    return text or None


@dataclass(frozen=True)
class FieldDef:
    name: str
    parse: Callable[[object], Any]
    help: str
    flag: bool = True  # settable by a command-line flag (not for secrets)


FIELDS: Final[tuple[FieldDef, ...]] = (
    FieldDef("name", _text, "node name (unique in the cluster; default: the host name)"),
    FieldDef("peer_host", _text, "address the peer listener binds (non-loopback needs a key)"),
    FieldDef("peer_port", _integer, "peer listener port (0: any free port)"),
    FieldDef("api_host", _text, "address the HTTP API binds (default 127.0.0.1)"),
    FieldDef("api_port", _integer, "HTTP API port (0: any free port)"),
    FieldDef("cluster_key", _optional_text, "cluster secret", flag=False),
    FieldDef("peers", _string_list, "static peers host:port, comma-separated"),
    FieldDef("mdns", _boolean, "find peers with mDNS (zeroconf)"),
    FieldDef("interfaces", _string_list, "IPv4 addresses zeroconf binds, comma-separated"),
    FieldDef("models", _string_list, "models this node offers to hold, comma-separated"),
    FieldDef("memory_budget", _optional_size, "memory this node may use for models (e.g. 2G)"),
    FieldDef("role", _text, f"role preference: {', '.join(ROLES)}"),
    FieldDef("backend", _text, f"execution backend: {', '.join(BACKENDS)}"),
    FieldDef("weights", _text, f"weight format: {', '.join(WEIGHTS)}"),
    FieldDef("threads", _integer, "CPU threads for forward passes (0: all cores)"),
    FieldDef("max_sessions", _integer, "sessions batched together on a model this node holds"),
    FieldDef("max_queue", _integer, "sessions waiting for a batch place before 429"),
    FieldDef("max_len", _integer, "tokens per session, prompt and reply together"),
    FieldDef("replicas", _integer, "nodes holding each model when enough can"),
    FieldDef(
        "drafter",
        _text,
        "drafter: none, ngram, model:NAME, text:NAME, trained[:PATH], feature[:PATH]",
    ),
    FieldDef("speculative", _boolean, "verify drafts when this node holds a model"),
    FieldDef("draft_k", _integer, "draft tokens per verify step (0: adaptive)"),
    FieldDef("drafter_backend", _text, "execution backend of a model drafter: torch, onnx"),
    FieldDef("drafter_weights", _text, f"weight format of a model drafter: {', '.join(WEIGHTS)}"),
    FieldDef("probe", _boolean, "measure the speed of offered models at start"),
    FieldDef("heartbeat", _number, "seconds between heartbeats"),
    FieldDef("dead_after", _number, "seconds of silence after which a peer is down"),
    FieldDef("shutdown_grace", _number, "seconds SIGTERM waits for sessions to finish"),
    FieldDef("api_max_body", parse_size, "largest HTTP request body (e.g. 1M)"),
    FieldDef("api_max_sessions", _integer, "concurrent generation requests the API admits"),
    FieldDef("log_level", _text, f"log level: {', '.join(LOG_LEVELS)}"),
)
FIELD_NAMES: Final = frozenset(f.name for f in FIELDS)
_BY_NAME: Final = {f.name: f for f in FIELDS}
# Keys that only the file may hold: they are turned into other fields while loading.
FILE_ONLY: Final = frozenset({"cluster_key_file"})


def check(config: NodeConfig) -> None:
    """Range and choice checks; ConfigError names the key."""
    from transport.connection import valid_node_id

    def bad(key: str, text: str) -> ConfigError:
        return ConfigError(f"{key}: {text}")

    if not valid_node_id(config.name):
        raise bad("name", f"{config.name!r} is not a valid node name (1-63 of A-Z a-z 0-9 _ . -)")
    for key in ("peer_port", "api_port"):
        port = getattr(config, key)
        if not 0 <= port < 65536:
            raise bad(key, f"{port} is not a port number (0-65535)")
    for key, choices in (
        ("role", ROLES),
        ("backend", BACKENDS),
        ("weights", WEIGHTS),
        ("drafter_backend", ("torch", "onnx")),
        ("drafter_weights", WEIGHTS),
        ("log_level", LOG_LEVELS),
    ):
        if getattr(config, key) not in choices:
            raise bad(key, f"{getattr(config, key)!r} is not one of {', '.join(choices)}")
    for key, low in (
        ("threads", 0),
        ("max_sessions", 1),
        ("max_queue", 0),
        ("max_len", 2),
        ("replicas", 1),
        ("api_max_body", 1),
        ("api_max_sessions", 1),
        ("draft_k", 0),
    ):
        if getattr(config, key) < low:
            raise bad(key, f"must be >= {low}, got {getattr(config, key)}")
    from models.drafter_loading import DrafterSpecError, parse_drafter_spec

    try:
        parse_drafter_spec(config.drafter)
    except DrafterSpecError as exc:
        raise bad("drafter", str(exc)) from None
    if config.memory_budget is not None and config.memory_budget < 0:
        raise bad("memory_budget", "must not be negative")
    if not 0 < config.heartbeat < config.dead_after:
        raise bad("heartbeat", "need 0 < heartbeat < dead_after")
    if config.shutdown_grace < 0:
        raise bad("shutdown_grace", "must be >= 0")
    for peer in config.peers:
        try:
            parse_peer(peer)
        except TransportConfigError as exc:
            raise bad("peers", str(exc)) from None


def _apply(
    values: dict[str, Any], raw: Mapping[str, object], source: str, sources: dict[str, str]
) -> None:
    for key, value in raw.items():
        fdef = _BY_NAME.get(key)
        if fdef is None:
            known = ", ".join(sorted(FIELD_NAMES | FILE_ONLY))
            raise ConfigError(f"{source}: unknown key {key!r} (known keys: {known})")
        try:
            values[key] = fdef.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
        sources[key] = source


def read_toml(path: Path) -> dict[str, object]:
    """The file's keys (a [node] table or top-level keys); ConfigError for bad TOML."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if set(data) == {"node"} and isinstance(data["node"], dict):
        data = data["node"]
    return dict(data)


def _key_from_file(path_text: object, source: str) -> str:
    try:
        path = Path(_text(path_text)).expanduser()
        secret = path.read_text(encoding="utf-8").strip()
    except ValueError as exc:
        raise ConfigError(f"{source}: cluster_key_file: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read cluster_key_file {path_text}: {exc.strerror or exc}"
        ) from None
    if not secret:
        raise ConfigError(f"{source}: cluster_key_file {path_text} is empty")
    return secret


def env_key(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> NodeConfig:
    """Defaults < TOML file < SLED_* variables < flags (None values in `flags` are unset)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for error messages
    if path is not None:
        raw = read_toml(path)
        key_file = raw.pop("cluster_key_file", None)
        _apply(values, raw, f"config file {path}", sources)
        if key_file is not None:
            values["cluster_key"] = _key_from_file(key_file, f"config file {path}")
    from_env = {f.name: env[env_key(f.name)] for f in FIELDS if env_key(f.name) in env}
    from_env.pop("cluster_key", None)
    _apply(values, from_env, "environment", sources)
    if env.get(ENV_KEY):
        values["cluster_key"] = env[ENV_KEY]
    if env.get("SLED_CLUSTER_KEY_FILE"):
        values["cluster_key"] = _key_from_file(env["SLED_CLUSTER_KEY_FILE"], "environment")
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    key_file_flag = given.pop("cluster_key_file", None)
    for key in given:
        if key not in _BY_NAME or not _BY_NAME[key].flag:
            raise ConfigError(f"command line: {key!r} cannot be set by a flag")
    _apply(values, given, "command line", sources)
    if key_file_flag is not None:
        values["cluster_key"] = _key_from_file(key_file_flag, "command line")
    try:
        return NodeConfig(**values)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        if key in sources:
            raise ConfigError(f"{sources[key]}: {exc}") from None
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def add_flags(parser: Any) -> None:
    """One `--kebab-case` flag per settable key (default None, so unset flags do not override),
    plus --config and --cluster-key-file."""
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument(
        "--cluster-key-file", default=None, help="file holding the cluster secret (not the secret)"
    )
    for fdef in FIELDS:
        if fdef.flag:
            parser.add_argument(
                "--" + fdef.name.replace("_", "-"), dest=fdef.name, default=None, help=fdef.help
            )


def flags_from_args(args: Any) -> dict[str, object]:
    out: dict[str, object] = {f.name: getattr(args, f.name, None) for f in FIELDS if f.flag}
    out["cluster_key_file"] = getattr(args, "cluster_key_file", None)
    return out


def describe(config: NodeConfig) -> dict[str, object]:
    """The configuration as JSON-ready values, the secret replaced by whether it is set."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["cluster_key"] = "set" if config.cluster_key else "unset"
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def unknown_env_keys(environ: Mapping[str, str], ignore: Sequence[str] = ()) -> list[str]:
    """SLED_* variables that name no config key (reported as a warning: other sled tools and
    tests use their own SLED_* variables, so they cannot be errors)."""
    known = {env_key(f.name) for f in FIELDS} | {ENV_KEY, "SLED_CLUSTER_KEY_FILE", *ignore}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
