"""Multi-adapter serving: one frozen base, many adapters in one batch (an adapter bank with
LRU swapping, continuous batching) and an OpenAI-compatible HTTP server (``peftjax serve``)."""

from peftjax.serving._bank import AdapterBank, rows_use
from peftjax.serving._engine import Engine, Request, ServingError

__all__ = ["AdapterBank", "Engine", "Request", "ServingError", "rows_use"]
