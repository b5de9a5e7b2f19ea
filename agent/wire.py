"""The daemon's own message types on the peer transport, and the registry that includes them.

- `NodeState` (notification): a node's capabilities, load level, draining flag, loaded models
  and its (epoch, digest) claim. Sent to a peer when it comes up, to all peers whenever it
  changes, and every few seconds as a refresh. This is how every node learns every peer's
  capabilities; the transport's heartbeats carry the fast-changing load figures.
- `GenerateOpen` (stream request): continue a session's committed tokens on a node that holds
  the model; answered by a stream of `Generated` items, the last one with `finish` set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from agent.probe import Capabilities
from transport.connection import ConnectionConfig, Timing
from transport.messages import CORE_MESSAGES
from transport.schema import Message, Tensor, message

FINISH_REASONS: Final = ("", "stop", "length")

# Refusal codes of a GenerateOpen (transport `error` frames): the home tries another holder.
OVERLOADED: Final = "overloaded"
NOT_HOLDING: Final = "not_holding"
DRAINING: Final = "draining"
BAD_SESSION: Final = "bad_session"


@message("node_state")
@dataclass(frozen=True)
class NodeState(Message):
    capabilities: Capabilities
    load_level: int
    draining: bool
    loaded: tuple[str, ...]  # models held and ready for sessions now
    epoch: int
    digest: str
    replicas: int
    active_sessions: int = 0
    queue_depth: int = 0


@message("generate_open")
@dataclass(frozen=True)
class GenerateOpen(Message):
    """Continue `committed` (prompt + tokens generated so far) by at most `max_new` tokens."""

    session_id: str
    model: str
    committed: Tensor  # int64 [n]
    max_new: int
    temperature: float
    top_p: float
    top_k: int
    seed: int

    def __post_init__(self) -> None:
        if self.max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {self.max_new}")


@message("generated")
@dataclass(frozen=True)
class Generated(Message):
    """Tokens at absolute positions position, position+1, ...; `finish` on the last item."""

    position: int
    tokens: tuple[int, ...]
    finish: str = ""

    def __post_init__(self) -> None:
        if self.finish not in FINISH_REASONS:
            raise ValueError(f"finish must be one of {FINISH_REASONS}, got {self.finish!r}")


DAEMON_MESSAGES: Final = CORE_MESSAGES.extend([NodeState, GenerateOpen, Generated])


def connection_config(heartbeat: float, dead_after: float) -> ConnectionConfig:
    return ConnectionConfig(
        registry=DAEMON_MESSAGES, timing=Timing(heartbeat_interval=heartbeat, dead_after=dead_after)
    )
