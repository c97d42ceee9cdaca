"""``ds4c serve``: an OpenAI-compatible HTTP server over ``ds4c.Engine``.

- ``protocol``: the request bodies (pydantic models) and their mapping to ``SamplingParams``.
- ``text``: incremental detokenization and stop strings of one streamed request.
- ``metrics``: the Prometheus registry behind ``/metrics``.
- ``app``: the FastAPI application (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
  ``/health``, ``/metrics``), admission control (429) and cancellation on disconnect.
- ``run``: uvicorn with draining on SIGTERM (``serve``).

The HTTP stack is FastAPI on uvicorn: pydantic validates the OpenAI bodies, Starlette streams
server-sent events and reports client disconnects, uvicorn handles signals and graceful shutdown.
The engine steps in its own thread (``Engine.start``); handlers wait on per-request asyncio events
that the engine sets (``Engine.submit(on_progress=...)``), so the event loop never blocks on a step.
"""

from ds4c.server.app import create_app
from ds4c.server.run import serve

__all__ = ["create_app", "serve"]
