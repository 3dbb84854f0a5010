"""The embedded SGLang-compatible engine (needs the ``engine`` extra: torch, fastapi, uvicorn).

A real Llama-style transformer in torch with a token-slot KV pool, a radix-tree prefix cache and a
continuous-batching scheduler, served over SGLang's HTTP protocol. Start it with ``llmpath engine serve`` or
:func:`llmpath.backends.engine.serve.serve`. Importing this package does not load torch: :class:`Engine` does.
"""

import warnings
from typing import TYPE_CHECKING, Any

# torch warns at import when numpy is absent; the engine itself never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from llmpath.backends.engine.args import EngineArgs  # noqa: E402
from llmpath.backends.engine.presets import PRESETS, ModelConfig  # noqa: E402

if TYPE_CHECKING:
    from llmpath.backends.engine.runtime import Engine

__all__ = ["PRESETS", "Engine", "EngineArgs", "ModelConfig"]


def __getattr__(name: str) -> Any:
    if name == "Engine":  # torch is loaded with it
        from llmpath.backends.engine.runtime import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
