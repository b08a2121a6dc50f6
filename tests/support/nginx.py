"""Moved to `tests.harness.nginx`; kept for existing imports."""

from __future__ import annotations

from tests.harness.nginx import (
    MODES,
    NginxError,
    NginxProcess,
    nginx_binary,
    render,
    require_nginx,
)

__all__ = ["MODES", "NginxError", "NginxProcess", "nginx_binary", "render", "require_nginx"]
