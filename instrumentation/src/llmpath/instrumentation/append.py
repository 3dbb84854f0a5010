"""Appending a short record to a file without handing the interpreter to other threads mid-request.

``os.write`` releases the GIL around the system call. An append of a few hundred bytes to the page cache takes a
couple of microseconds, but releasing the GIL lets a waiting background thread (an OTel batch span processor's
worker, woken to export) contend for it on every request: the woken thread wakes, loses the race to the request's
thread, sleeps again and, because the GIL keeps changing hands, never times out into a clean switch. Measured with a
batch span processor at 10 % sampling, that costs the request thread ≈ 10 µs per request
(``bench/instrumentation_overhead.py``). Writing while holding the GIL, through libc's ``write`` called via
``ctypes.PyDLL`` (which keeps the GIL), lets the waiting thread take its turn at the next regular switch interval.

The write is still one ``write(2)`` on an ``O_APPEND`` descriptor: atomic with respect to other appenders and
durable against the process being killed as soon as it returns. Where libc cannot be loaded (Windows, a Python
without ``ctypes``) it falls back to ``os.write``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

try:  # some minimal Python builds have no _ctypes
    import ctypes
except ImportError:  # pragma: no cover
    ctypes = None  # type: ignore[assignment]


def _libc_write() -> Callable[[int, bytes, int], int] | None:
    if ctypes is None:  # pragma: no cover
        return None
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        write = libc.write
    except (OSError, AttributeError, TypeError):
        return None
    # No ``argtypes``: ctypes passes an int as C int and bytes as ``char *`` by itself, which is what ``write``
    # takes for a descriptor and a line (lengths stay far below 2**31), and checking declared argument types
    # costs about a third of the call.
    write.restype = ctypes.c_ssize_t
    return write


_write = _libc_write()


def append_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (normally in one ``write(2)``), keeping the GIL; raises ``OSError``."""
    if _write is None:
        _append_releasing_gil(fd, data)
        return
    while True:
        written = _write(fd, data, len(data))
        if written == len(data):
            return
        if written < 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            raise OSError(code, os.strerror(code))
        data = data[written:]  # only on a full disk or a signal mid-write; keep the line whole


def _append_releasing_gil(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):
        written += os.write(fd, data[written:])
