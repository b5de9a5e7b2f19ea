"""The daemon's own message types on the peer transport, and the registry that includes them.

- `NodeState` (notification): a node's capabilities, load level, draining flag, loaded models
  and its (epoch, digest) claim. Sent to a peer when it comes up, to all peers whenever it
  changes, and every few seconds as a refresh. This is how every node learns every peer's
  capabilities; the transport's heartbeats carry the fast-changing load figures.
- `GenerateOpen` (stream request): continue a session's committed tokens on a node that holds
  the model; answered by a stream of `Generated` items, the last one with `finish` set (it also
  carries the session's speculative-decoding figures).
- `DraftRequest` (request, verifier -> drafter): the session's committed tokens as a delta
  against what this drafter already has (`keep` tokens of it stand), and how many tokens to
  draft (for a feature drafter also the target's features of the positions it lacks); answered by `DraftReply` (token ids and, for sampled drafts, the sparse proposal
  distribution). `DraftClose` (notification) ends a drafting session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from agent.probe import Capabilities
from transport.connection import ConnectionConfig, Timing
from transport.messages import CORE_MESSAGES
from transport.schema import Message, Tensor, message

FINISH_REASONS: Final = ("", "stop", "length")
MAX_DRAFT_K: Final = 32

# Refusal codes of a GenerateOpen (transport `error` frames): the home tries another holder.
OVERLOADED: Final = "overloaded"
NOT_HOLDING: Final = "not_holding"
DRAINING: Final = "draining"
BAD_SESSION: Final = "bad_session"
# Refusal codes of a DraftRequest: the verifier resends everything, or drafts elsewhere.
UNKNOWN_DRAFT_SESSION: Final = "unknown_draft_session"
MISSING_FEATURES: Final = "missing_features"  # a feature drafter lacks positions' features
NOT_DRAFTING: Final = "not_drafting"


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


@dataclass(frozen=True)
class SpeculationStats:
    """A session's speculative decoding so far, as its verifier counted it."""

    kind: str = ""  # drafter kind ("" when nothing was drafted)
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    draft_k: float = 0.0  # mean draft length asked for

    def to_json(self) -> dict[str, object]:
        steps = self.verify_steps
        return {
            "drafter": self.kind or "none",
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "verify_steps": steps,
            "tokens_per_verify_step": round((self.accepted + steps) / steps, 3) if steps else 0.0,
            "mean_draft_k": round(self.draft_k, 3),
        }


@message("generated")
@dataclass(frozen=True)
class Generated(Message):
    """Tokens at absolute positions position, position+1, ...; `finish` on the last item."""

    position: int
    tokens: tuple[int, ...]
    finish: str = ""
    stats: SpeculationStats | None = None  # on the last item

    def __post_init__(self) -> None:
        if self.finish not in FINISH_REASONS:
            raise ValueError(f"finish must be one of {FINISH_REASONS}, got {self.finish!r}")


@message("draft_request")
@dataclass(frozen=True)
class DraftRequest(Message):
    """Draft up to k tokens after `committed`, where committed = (the first `keep` tokens this
    drafter already holds for the session) + `tokens`. `features` (feature drafters): the
    target's final-normed hidden states [n, dim] for the last n positions up to
    len(committed)-2; the drafter holds those before them."""

    session_id: str
    model: str  # the target model the draft is for
    keep: int
    tokens: Tensor  # int64 [n]
    k: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    features: Tensor | None = None  # bf16/fp32 [n, dim]

    def __post_init__(self) -> None:
        if self.keep < 0 or not 1 <= self.k <= MAX_DRAFT_K:
            raise ValueError(f"need keep >= 0 and 1 <= k <= {MAX_DRAFT_K}")


@message("draft_reply")
@dataclass(frozen=True)
class DraftReply(Message):
    """Draft tokens for positions position, position+1, ...; q_ids/q_probs [k, m] hold the
    sparse proposal distribution (m = 0: a deterministic proposal)."""

    position: int
    tokens: Tensor  # int64 [k]
    q_ids: Tensor  # int64 [k, m]
    q_probs: Tensor  # float32 [k, m]
    kind: str
    draft_s: float


@message("draft_close")
@dataclass(frozen=True)
class DraftClose(Message):
    session_id: str


DAEMON_MESSAGES: Final = CORE_MESSAGES.extend(
    [NodeState, GenerateOpen, Generated, DraftRequest, DraftReply, DraftClose]
)


def connection_config(heartbeat: float, dead_after: float) -> ConnectionConfig:
    return ConnectionConfig(
        registry=DAEMON_MESSAGES, timing=Timing(heartbeat_interval=heartbeat, dead_after=dead_after)
    )
