"""dualcast: one Redis Stream fanned out to WebSocket, SSE and long-polling subscribers."""

__version__ = "0.1.0"
