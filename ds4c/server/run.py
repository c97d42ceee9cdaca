"""Running the app: uvicorn, with draining on SIGTERM / SIGINT.

On the signal the server stops accepting connections and answers 503 to new requests on open
ones; requests in flight go on for up to ``grace`` seconds (uvicorn's graceful shutdown), then the
rest are cancelled (their pages freed), the engine's loop stops and the process exits."""

from __future__ import annotations

import signal
import threading

import uvicorn

from ds4c.runtime.engine import Engine
from ds4c.runtime.tokenizer import Tokenizer
from ds4c.server.app import create_app


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        self._app.state.server.draining = True
        super().handle_exit(sig, frame)


def serve(engine: Engine, tokenizer: Tokenizer, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_waiting: int = 256, grace: float = 30.0, log_level: str = "info", on_ready=None) -> None:
    """Serve ``engine`` over HTTP until SIGTERM / SIGINT (blocking). ``on_ready(port)`` is called
    once the socket listens (port 0 picks a free one)."""
    app = create_app(engine, tokenizer, model_name=model_name, max_waiting=max_waiting)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                            lifespan="on")
    server = _DrainingServer(config, app)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            if server.started:
                bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
                on_ready(bound)

        server.startup = startup
    # uvicorn raises the signal it drained on again once it is done, to the handler it found: a
    # drained SIGTERM is then a clean exit (status 0), not death by signal
    if threading.current_thread() is not threading.main_thread():  # no signals off the main thread
        server.run()
        return
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
