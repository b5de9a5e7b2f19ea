"""`sled status`: the cluster as one node sees it, as a table (or its /status JSON)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"


class StatusError(Exception):
    """A node's /status could not be read (not running, wrong address, not a sled node)."""


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET {url}/status as JSON; StatusError says what went wrong."""
    target = url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{target} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach {target}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise StatusError(f"{target} did not answer JSON (is it a sled node?)") from None
    if not isinstance(data, dict) or "node" not in data:
        raise StatusError(f"{target} did not answer a sled status object")
    return data


def cluster_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per node (this one first): node, alive, roles, models, load, epoch."""
    plan = status.get("plan") or {}
    holders: dict[str, list[str]] = {}
    for model, nodes in (plan.get("models") or {}).items():
        for node in nodes:
            holders.setdefault(node, []).append(model)

    def roles(name: str, alive: bool) -> str:
        if not alive:
            return "-"
        return "verifier" if holders.get(name) else "client"

    def models(loaded: Sequence[str], planned: Sequence[str]) -> str:
        parts = [m for m in loaded] + [f"{m} (loading)" for m in planned if m not in loaded]
        return ", ".join(parts) or "-"

    me = str(status["node"])
    load = status.get("load") or {}
    rows: list[tuple[str, ...]] = [
        (
            me + " *",
            "yes",
            roles(me, True),
            models(status.get("loaded") or [], holders.get(me, [])),
            f"{load.get('engine_active', 0)} active, {load.get('engine_queued', 0)} queued",
            str(status.get("epoch", "?")),
        )
    ]
    for peer in status.get("peers") or []:
        name, alive = str(peer.get("name")), bool(peer.get("alive"))
        peer_load = peer.get("load") or {}
        rows.append(
            (
                name,
                "yes" if alive else "no",
                roles(name, alive),
                models(peer.get("loaded") or [], holders.get(name, []) if alive else []),
                f"{peer_load.get('active_sessions', 0)} active, "
                f"{peer_load.get('queue_depth', 0)} queued"
                if alive
                else "-",
                str(peer.get("epoch", "?")) if alive else "-",
            )
        )
    return rows


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    table = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


HEADER = ("NODE", "ALIVE", "ROLES", "MODELS", "LOAD", "EPOCH")


def render(status: dict[str, Any]) -> str:
    plan = status.get("plan") or {}
    lines = [format_table(cluster_rows(status), HEADER)]
    placed = plan.get("models") or {}
    summary = "; ".join(f"{m} on {', '.join(n)}" for m, n in sorted(placed.items())) or "nothing"
    lines.append(f"\nplan (epoch {status.get('epoch', '?')}): {summary}")
    if plan.get("unplaced"):
        lines.append(f"no node can hold now: {', '.join(plan['unplaced'])}")
    if status.get("sessions"):
        lines.append(f"sessions homed at {status['node']}: {len(status['sessions'])}")
    return "\n".join(lines)


def cmd_status(url: str, as_json: bool) -> int:
    try:
        status = fetch_status(url)
    except StatusError as exc:
        print(f"sled status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return 0
