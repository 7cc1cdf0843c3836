"""joey's OpenAI-compatible server: ``joey serve`` (see ``joey.server.app``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from joey.server.app import JoeyServer, ServerSettings

__all__ = ["JoeyServer", "ServerSettings", "serve"]


def serve(load: Callable[[], Any], settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> int:
    """Bind, load the model in the background (``/health`` says 503 until it is ready) and serve
    until interrupted. Returns the exit status: 2 when the model fails to load."""
    import uvicorn

    server = JoeyServer(load, settings)
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    runner = uvicorn.Server(config)

    def stop() -> None:
        runner.should_exit = True

    server.on_load_error = stop
    runner.run()
    if server.load_error:
        print(f"joey: error: {server.load_error}", file=sys.stderr)
        return 2
    return 0 if runner.started else 1
