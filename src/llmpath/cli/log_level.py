"""The ``--log-level`` choices of the server commands (gateway, engine): Python's logging levels."""

from __future__ import annotations

from enum import StrEnum


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"
