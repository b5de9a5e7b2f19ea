"""Helpers for API tests: a real LocalService on a tiny model behind a real aiohttp server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from agent.api import create_app
from agent.local_service import LocalService

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the openai package must never reach a hub


def tiny_service(path: Path, **kwargs: Any) -> LocalService:
    """fp32 torch weights (the accuracy reference), converted fresh (no weight cache writes)."""
    options: dict[str, Any] = {
        "backend": "torch",
        "weights": "fp32",
        "use_cache": False,
        "max_len": 512,
        "node_name": "test-node",
    }
    options.update(kwargs)
    return LocalService.load(str(path), **options)


@asynccontextmanager
async def serve(service: LocalService, **app_options: Any) -> AsyncIterator[str]:
    """Serve the API on 127.0.0.1 at a free port; yields the base URL (ending in '/')."""
    app = create_app(service, metrics=service.metrics, **app_options)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()
        await service.close()
