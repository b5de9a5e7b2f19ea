"""Typed errors of the transport layer.

Every failure a peer, a client or a config can cause maps to one of these, so callers can tell
"this peer sent garbage" from "this peer is gone" from "you configured it wrong".
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error raised by `transport`."""


class FrameError(TransportError):
    """A frame broke the wire format or the limits; `code` names the rule it broke.

    The connection that received it answers with an `error` frame carrying `code` and the text,
    then closes; other connections are unaffected.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class AuthError(TransportError):
    """The peer failed (or refused) the cluster-key challenge-response."""


class ConfigError(TransportError):
    """The local configuration is unusable (e.g. no cluster key for a non-loopback listener)."""


class ConnectionClosedError(TransportError):
    """The connection closed (cleanly or not) while a caller was waiting on it."""


class PeerDeadError(ConnectionClosedError):
    """The peer stopped answering: no bytes for longer than the dead-peer timeout."""


class RemoteError(TransportError):
    """The peer answered a request with an `error` message (its handler failed or refused)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"peer replied with error {code}: {text}")
        self.code = code
        self.text = text


class UnexpectedReplyError(TransportError):
    """The peer replied with a message of another type than the caller expected."""


class DialError(ConnectionClosedError):
    """Could not reach a peer (refused, unreachable, timed out) or bind a listener."""
