"""Moved to `tests.harness.tcpproxy`; kept for existing imports."""

from __future__ import annotations

from tests.harness.tcpproxy import TCPProxy

__all__ = ["TCPProxy"]
