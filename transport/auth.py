"""Cluster key, cluster id and the HMAC-SHA256 challenge-response both peers must pass.

The secret itself never leaves this module: what is stored is a key stretched with PBKDF2 and
split by purpose (authentication vs. the public cluster id), so neither mDNS records nor logs
can carry it, and a cluster id seen on the network costs a brute-forcer PBKDF2 per guess.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import msgpack

from transport.errors import ConfigError

ENV_KEY: Final = "SLED_CLUSTER_KEY"
NONCE_BYTES: Final = 32
_KDF_SALT: Final = b"sled-cluster-key-v1"
_KDF_ROUNDS: Final = 200_000
ROLE_DIALER: Final = "dialer"
ROLE_LISTENER: Final = "listener"
HOW_TO_SET_KEY: Final = (
    f"set the same secret on every node with the {ENV_KEY} environment variable "
    f"(e.g. {ENV_KEY}=$(openssl rand -hex 16)) or the config file"
)


@dataclass(frozen=True, repr=False)
class ClusterKey:
    """Derived key material; `repr` shows only the public cluster id."""

    cluster_id: str
    configured: bool
    _auth_key: bytes = field(compare=False)

    def __repr__(self) -> str:
        return f"ClusterKey(cluster_id={self.cluster_id!r}, configured={self.configured})"

    @staticmethod
    def from_secret(secret: str | bytes | None) -> ClusterKey:
        """Derives the key; None or empty means "no key" (only loopback listeners allowed)."""
        raw = secret.encode() if isinstance(secret, str) else (secret or b"")
        master = hashlib.pbkdf2_hmac("sha256", raw, _KDF_SALT, _KDF_ROUNDS)
        cluster_id = hmac.new(master, b"cluster-id", hashlib.sha256).hexdigest()[:16]
        auth_key = hmac.new(master, b"auth", hashlib.sha256).digest()
        return ClusterKey(cluster_id, bool(raw), auth_key)

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> ClusterKey:
        env = os.environ if environ is None else environ
        return ClusterKey.from_secret(env.get(ENV_KEY) or None)

    def proof(self, role: str, dialer: tuple[str, bytes], listener: tuple[str, bytes]) -> bytes:
        """HMAC over both (node id, nonce) pairs; the role label keeps one side's proof from
        being reflected back as the other's."""
        transcript = msgpack.packb(["sled-auth-v1", role, *dialer, *listener])
        return hmac.new(self._auth_key, transcript, hashlib.sha256).digest()

    def verify(
        self, proof: bytes, role: str, dialer: tuple[str, bytes], listener: tuple[str, bytes]
    ) -> bool:
        return hmac.compare_digest(proof, self.proof(role, dialer, listener))


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback literals; wildcards and other names are not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_allowed(host: str, key: ClusterKey) -> None:
    """Refuses a keyless node listening anywhere but loopback, saying how to set a key."""
    if not key.configured and not is_loopback_host(host):
        raise ConfigError(
            f"refusing to listen on {host or 'all interfaces'!r} without a cluster key: "
            f"{HOW_TO_SET_KEY}; or listen on 127.0.0.1 only"
        )
