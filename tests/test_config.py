"""Daemon configuration: TOML < SLED_* environment < flags, and clear errors for bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.config import (
    ConfigError,
    NodeConfig,
    add_flags,
    describe,
    flags_from_args,
    load_config,
    parse_size,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sled.toml"
    path.write_text(text)
    return path


def test_defaults_are_loopback_and_valid() -> None:
    config = load_config(None, environ={})
    assert config.api_host == "127.0.0.1" and config.peer_host == "127.0.0.1"
    assert config.role == "auto" and config.cluster_key is None
    assert config.zeroconf_interfaces == ["127.0.0.1"]


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "from-file"\napi_port = 9001\nmodels = ["tiny-qwen2", "tiny-llama"]\n'
        'memory_budget = "1.5G"\npeers = ["10.0.0.2:7070"]\n',
    )
    env = {"SLED_API_PORT": "9002", "SLED_ROLE": "verifier", "SLED_CLUSTER_KEY": "s3cret"}
    config = load_config(path, environ=env, flags={"role": "client", "name": None})
    assert config.name == "from-file"  # an unset flag does not override
    assert config.api_port == 9002  # env beats the file
    assert config.role == "client"  # a flag beats env
    assert config.models == ("tiny-qwen2", "tiny-llama")
    assert config.memory_budget == int(1.5 * 2**30)
    assert config.static_peers == (("10.0.0.2", 7070),)
    assert config.cluster_key == "s3cret"


def test_node_table_and_key_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("abc123\n")
    path = write(tmp_path, f'[node]\nname = "n1"\ncluster_key_file = "{secret}"\n')
    config = load_config(path, environ={})
    assert config.cluster_key == "abc123"
    assert "abc123" not in repr(config)
    assert describe(config)["cluster_key"] == "set"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = ", "not valid TOML"),
        ("colour = 'red'", "unknown key 'colour'"),
        ("api_port = 'eighty'", "api_port: expected an integer"),
        ("api_port = 70000", "api_port: 70000 is not a port number"),
        ("role = 'boss'", "role: 'boss' is not one of auto, verifier, drafter, client"),
        ("mdns = 3", "mdns: expected true or false"),
        ("memory_budget = 'lots'", "memory_budget: expected a size"),
        ("peers = ['nohost']", "peers: static peer 'nohost'"),
        ("name = 'bad name!'", "not a valid node name"),
        ("heartbeat = 5.0", "heartbeat < dead_after"),
        ("max_sessions = 0", "max_sessions: must be >= 1"),
        ("cluster_key_file = '/nonexistent/key'", "cannot read cluster_key_file"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(write(tmp_path, text), environ={})


def test_bad_env_and_flags() -> None:
    with pytest.raises(ConfigError, match="environment: max_len: expected an integer"):
        load_config(None, environ={"SLED_MAX_LEN": "long"})
    with pytest.raises(ConfigError, match="command line: threads"):
        load_config(None, environ={}, flags={"threads": "-x"})
    with pytest.raises(ConfigError, match="cannot be set by a flag"):
        load_config(None, environ={}, flags={"cluster_key": "visible-in-ps"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Path("/nonexistent/sled.toml"), environ={})


def test_argparse_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--api-port", "0", "--models", "a,b", "--no-such"][:4])
    config = load_config(args.config, environ={}, flags=flags_from_args(args))
    assert config.api_port == 0 and config.models == ("a", "b")
    assert "--cluster-key" not in parser.format_help().replace("--cluster-key-file", "")


def test_sizes() -> None:
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("-1G")
    assert NodeConfig(name="x", memory_budget=None).memory_budget is None
