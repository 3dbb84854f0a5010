"""The gateway's logs: one handler on stderr for its own loggers and uvicorn's, text or JSON lines, every line of a
request carrying its ``request_id`` and trace context (:class:`~llmpath.instrumentation.RequestLogFilter`).

Never logs prompt text or keys: the gateway's own messages name requests by id, and uvicorn's access log (off unless
``--access-log``) has the method, path and status only, with the values of any query parameters masked (a client
that puts its key in the URL must not put it in the log).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from llmpath.instrumentation.logs import LOG_FIELDS, NO_VALUE

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: uvicorn's access-log record arguments, in its order (``uvicorn.logging.AccessFormatter``).
_ACCESS_ARGS = ("client_addr", "method", "path", "http_version", "status")


#: What replaces a query parameter's value in the access log.
MASK = "***"


class AccessLogFilter(logging.Filter):
    """Masks the query parameters' values in uvicorn's access lines: ``/v1/models?api_key=***``. Names stay as the
    client sent them (still percent-encoded: nothing decoded can forge a line); a parameter without ``=`` is all
    value (``?sk-...`` becomes ``?***``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = _access_args(record)
        if args is not None and "?" in str(args[2]):
            path, _, query = str(args[2]).partition("?")
            record.args = (args[0], args[1], f"{path}?{mask_query(query)}", args[3], args[4])
        return True


def _access_args(record: logging.LogRecord) -> tuple[object, ...] | None:
    """The arguments of one of uvicorn's access lines (in :data:`_ACCESS_ARGS` order), or ``None``."""
    args = record.args
    if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == len(_ACCESS_ARGS):
        return args
    return None


def mask_query(query: str) -> str:
    """``a=1&b&c=2`` → ``a=***&***&c=***`` (the raw query: nothing decoded). A part that looks like a token rather
    than a parameter (no ``=``, a name over 32 characters, or a value of ``=`` padding only, as base64 ends) is
    masked whole."""
    return "&".join(_mask_part(part) for part in query.split("&") if part)


def _mask_part(part: str) -> str:
    name, equals, value = part.partition("=")
    if not equals or len(name) > 32 or value.strip("=") == "":
        return MASK
    return f"{name}={MASK}"


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then `` request_id=… trace_id=…`` for a line logged while serving a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        for field in ("request_id", "trace_id"):
            value = getattr(record, field, NO_VALUE)
            if value != NO_VALUE:
                line += f" {field}={value}"
        return line


class JsonLinesFormatter(JsonFormatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, the request's ids when it has them,
    ``exc_info`` with a traceback; uvicorn's access lines add ``method``, ``path`` and ``status``."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            timestamp="time",  # ISO 8601, UTC
            rename_fields={"levelname": "level", "name": "logger"},
            # uvicorn's coloured copy of some messages is noise in a log pipeline.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        for field in LOG_FIELDS:
            if log_data.get(field) == NO_VALUE:
                del log_data[field]
        args = _access_args(record)
        if args is not None:
            access = dict(zip(_ACCESS_ARGS, args, strict=True))
            log_data.update(method=access["method"], path=access["path"], status=access["status"])


def logging_config(level: str, fmt: LogFormat) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the gateway process, uvicorn's loggers included (pass it to
    ``uvicorn.Config(log_config=...)``, which applies it)."""
    formatter = JsonLinesFormatter if fmt == "json" else TextFormatter
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request": {"()": "llmpath.instrumentation.RequestLogFilter"},
            "access": {"()": f"{__name__}.{AccessLogFilter.__qualname__}"},
        },
        "formatters": {"gateway": {"()": f"{__name__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "gateway",
                "filters": ["request", "access"],
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's own handlers are replaced by the root's (one format for every line).
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
            "httpx": {"level": "WARNING"},  # one line per backend call is noise
        },
    }
