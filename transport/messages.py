"""The message types of the transport itself, plus generic tensor carriers.

The daemon adds its own types with `@message` and `CORE_MESSAGES.extend([...])`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from transport.schema import Message, Registry, Tensor, message


@message("auth_hello")
@dataclass(frozen=True)
class AuthHello(Message):
    """Dialer -> listener, first frame: who I am and my challenge nonce."""

    node_id: str
    nonce: bytes
    listen_port: int
    api_port: int
    capabilities: str


@message("auth_challenge")
@dataclass(frozen=True)
class AuthChallenge(Message):
    """Listener -> dialer: who I am, my nonce, and my proof that I know the cluster key."""

    node_id: str
    nonce: bytes
    proof: bytes
    listen_port: int
    api_port: int
    capabilities: str


@message("auth_proof")
@dataclass(frozen=True)
class AuthProof(Message):
    """Dialer -> listener: the dialer's proof over both nonces."""

    proof: bytes


@message("auth_ok")
@dataclass(frozen=True)
class AuthOk(Message):
    """Listener -> dialer: proof accepted, application frames may flow."""


@message("error")
@dataclass(frozen=True)
class Error(Message):
    """A refusal: a bad frame (then the sender closes) or a failed request."""

    code: str
    text: str


@dataclass(frozen=True)
class Load:
    """Load figures a node reports in every heartbeat."""

    queue_depth: int = 0  # requests waiting for this node's model
    active_sessions: int = 0
    free_memory: int = 0  # bytes
    load_avg: float = 0.0  # 1-minute load average divided by CPU count


@message("heartbeat")
@dataclass(frozen=True)
class Heartbeat(Message):
    """Sent every heartbeat interval both ways; silence means the peer is dead."""

    load: Load
    sent_at: float  # sender's wall clock, for display only


@message("ping")
@dataclass(frozen=True)
class Ping(Message):
    nonce: int


@message("pong")
@dataclass(frozen=True)
class Pong(Message):
    nonce: int


@message("cancel")
@dataclass(frozen=True)
class Cancel(Message):
    """Requester -> responder: stop working on the request whose id the frame carries."""


@message("credit")
@dataclass(frozen=True)
class Credit(Message):
    """Stream reader -> writer: it may send `items` more stream items (flow control)."""

    items: int


@message("stream_end")
@dataclass(frozen=True)
class StreamEnd(Message):
    """Last frame of a server-pushed stream."""


@dataclass(frozen=True)
class PeerAddress:
    node_id: str
    host: str
    port: int


@message("peer_list")
@dataclass(frozen=True)
class PeerList(Message):
    """The peers a node is connected to, so that static-peer-only nodes learn the others."""

    peers: tuple[PeerAddress, ...]


@message("activations")
@dataclass(frozen=True)
class Activations(Message):
    """Hidden states of a layer segment for some positions of a session."""

    session_id: str
    positions: Tensor
    hidden: Tensor


@message("tokens")
@dataclass(frozen=True)
class Tokens(Message):
    """Token ids for a session (drafts, accepted tokens, prompts)."""

    session_id: str
    tokens: Tensor


AUTH_MESSAGES: Final = frozenset({"auth_hello", "auth_challenge", "auth_proof", "auth_ok", "error"})

CORE_MESSAGES: Final = Registry.of(
    [
        AuthHello,
        AuthChallenge,
        AuthProof,
        AuthOk,
        Error,
        Heartbeat,
        Ping,
        Pong,
        Cancel,
        Credit,
        StreamEnd,
        PeerList,
        Activations,
        Tokens,
    ]
)
