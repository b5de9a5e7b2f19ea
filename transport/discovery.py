"""Finding peers: zeroconf (mDNS/DNS-SD) service `_sled._tcp.local.`, plus static peers.

A node registers one service whose TXT record says who it is (node id, cluster id — a hash,
never the key — protocol version, peer and API ports, a capability summary) and browses for
the others. Records of other clusters are ignored. mDNS says only that a node *was* there: a
killed node's record lingers for minutes, so liveness comes from connection heartbeats and
`PeerGone` is a hint, not a verdict.

Where multicast does not work, `--peer host:port` static peers bootstrap the mesh instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from transport.connection import valid_node_id
from transport.errors import ConfigError, TransportError
from transport.frames import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_sled._tcp.local."
MAX_TXT_VALUE: Final = 200  # DNS caps one TXT string at 255 bytes, key included
RESOLVE_TIMEOUT_MS: Final = 3000
GOODBYE_TIMEOUT: Final = 1.0


class DiscoveryError(TransportError):
    """A malformed record or an unusable discovery setting."""


@dataclass(frozen=True)
class Advertisement:
    """What a node tells the network about itself (all public)."""

    node_id: str
    cluster_id: str
    peer_port: int
    api_port: int = 0
    capabilities: str = ""
    protocol: int = PROTOCOL_VERSION
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not valid_node_id(self.node_id):
            raise DiscoveryError(f"invalid node id {self.node_id!r}")
        if len(self.capabilities.encode()) > MAX_TXT_VALUE:
            raise DiscoveryError(
                f"capability summary is {len(self.capabilities.encode())} bytes, "
                f"at most {MAX_TXT_VALUE} fit in a TXT record"
            )


@dataclass(frozen=True)
class PeerSeen:
    advertisement: Advertisement


@dataclass(frozen=True)
class PeerGone:
    """The node's mDNS record was withdrawn or expired (a hint; heartbeats decide liveness)."""

    node_id: str


DiscoveryEvent = PeerSeen | PeerGone


def to_txt(ad: Advertisement) -> dict[str, str]:
    return {
        "node": ad.node_id,
        "cluster": ad.cluster_id,
        "proto": str(ad.protocol),
        "api": str(ad.api_port),
        "caps": ad.capabilities,
    }


def from_txt(
    properties: Mapping[bytes, bytes | None], addresses: Sequence[str], port: int
) -> Advertisement:
    """Parses a TXT record; DiscoveryError names what is wrong with it."""
    text: dict[str, str] = {}
    for key, value in properties.items():
        try:
            text[key.decode()] = (value or b"").decode()
        except UnicodeDecodeError:
            raise DiscoveryError(f"TXT entry {key!r} is not UTF-8") from None
    missing = sorted({"node", "cluster", "proto", "api"} - text.keys())
    if missing:
        raise DiscoveryError(f"TXT record lacks {missing}")
    try:
        protocol, api_port = int(text["proto"]), int(text["api"])
    except ValueError:
        raise DiscoveryError("TXT proto/api are not integers") from None
    if not 0 < port < 65536 or not 0 <= api_port < 65536:
        raise DiscoveryError(f"ports out of range: peer {port}, api {api_port}")
    return Advertisement(
        node_id=text["node"],
        cluster_id=text["cluster"],
        peer_port=port,
        api_port=api_port,
        capabilities=text.get("caps", ""),
        protocol=protocol,
        addresses=tuple(addresses),
    )


def instance_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def local_ipv4_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses (what to advertise on all interfaces)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found


def parse_peer(text: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[addr]:port`) of a static peer; ConfigError explains a bad one."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"static peer {text!r}: expected host:port, e.g. 192.168.1.20:7070")
    return host, int(port_text)


class Discovery:
    """Registers this node's service and reports other nodes of the same cluster.

    `interfaces`: IPv4 addresses to bind and advertise (None: all interfaces). Tests pass
    ['127.0.0.1'] so that no packet leaves the machine.
    """

    def __init__(
        self,
        advertisement: Advertisement,
        on_event: Callable[[DiscoveryEvent], None],
        *,
        interfaces: Sequence[str] | None = None,
    ) -> None:
        self._ad = advertisement
        self._on_event = on_event
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        ad = self._ad
        addresses = self._interfaces if self._interfaces is not None else local_ipv4_addresses()
        if not addresses:
            raise ConfigError("no IPv4 address to advertise; pass interfaces explicitly")
        self._zc = AsyncZeroconf(
            interfaces=self._interfaces if self._interfaces is not None else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(ad.node_id),
            addresses=[socket.inet_aton(a) for a in addresses],
            port=ad.peer_port,
            properties=to_txt(ad),
            server=f"{ad.node_id}.local.",
        )
        # Node ids are unique by construction, so skip the ~1 s name probe (cooperating
        # responders) and announce at once.
        await self._zc.async_register_service(self._info, cooperating_responders=True)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._state_changed]
        )

    async def close(self) -> None:
        for task in self._resolving.values():
            task.cancel()
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            if self._info is not None:
                # The goodbye packets go out from a task; wait for them (bounded) so that
                # other nodes drop the record now instead of when it expires.
                sent = await self._zc.async_unregister_service(self._info)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(sent, GOODBYE_TIMEOUT)
            await self._zc.async_close()
            self._zc = None

    def _state_changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == instance_name(self._ad.node_id):
            return
        if state_change is ServiceStateChange.Removed:
            node_id = name.removesuffix("." + SERVICE_TYPE)
            if valid_node_id(node_id):
                self._on_event(PeerGone(node_id))
        elif name not in self._resolving:
            task = asyncio.get_running_loop().create_task(self._resolve(name))
            self._resolving[name] = task
            task.add_done_callback(lambda _: self._resolving.pop(name, None))

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("no answer resolving %s", name)
            return
        try:
            ad = from_txt(info.properties, info.parsed_addresses(IPVersion.V4Only), info.port or 0)
        except DiscoveryError as exc:
            log.info("ignoring malformed record %s: %s", name, exc)
            return
        if ad.cluster_id != self._ad.cluster_id or ad.node_id == self._ad.node_id:
            return
        if ad.protocol != PROTOCOL_VERSION:
            log.warning(
                "node %s speaks protocol %d, this node %d: not connecting",
                ad.node_id,
                ad.protocol,
                PROTOCOL_VERSION,
            )
            return
        self._on_event(PeerSeen(ad))
