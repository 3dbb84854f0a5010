"""llmpath backends: the streaming Backend interface and its implementations.

``create_backend("sglang", url)`` talks to SGLang (or the embedded engine, ``llmpath.backends.engine``);
``create_backend("openai", url)`` to any OpenAI-compatible server. Importing this package never imports torch.
"""

from llmpath.backends.base import (
    Backend,
    BackendAborted,
    BackendBadRequest,
    BackendError,
    BackendEvent,
    BackendProtocolError,
    BackendRequest,
    BackendServerError,
    BackendTimeout,
    BackendTimings,
    BackendUnavailable,
    BackendUnreachable,
    ChatMessage,
    Done,
    FirstToken,
    SamplingParams,
    Scheduled,
    TimingSource,
    TokenDelta,
    Usage,
)
from llmpath.backends.factory import KINDS, create_backend
from llmpath.backends.openai import OpenAIBackend
from llmpath.backends.sglang import SGLangBackend

__all__ = [
    "BackendAborted",
    "KINDS",
    "Backend",
    "BackendBadRequest",
    "BackendError",
    "BackendEvent",
    "BackendProtocolError",
    "BackendRequest",
    "BackendServerError",
    "BackendTimeout",
    "BackendTimings",
    "BackendUnavailable",
    "BackendUnreachable",
    "ChatMessage",
    "Done",
    "FirstToken",
    "OpenAIBackend",
    "SGLangBackend",
    "SamplingParams",
    "Scheduled",
    "TimingSource",
    "TokenDelta",
    "Usage",
    "create_backend",
]
