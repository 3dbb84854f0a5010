"""Token prices per model, to turn the ledger's token counts into cost and what the prompt cache saved.

A TOML file, prices in a currency of your choice per million tokens, by the ledger's ``model``::

    currency = "USD"              # optional, shown in the report

    [models."llama-3-8b"]
    input = 0.20                  # per million prompt tokens not served from cache
    cached_input = 0.05           # per million prompt tokens served from cache (default: input, no discount)
    output = 0.60                 # per million output tokens

    [models."*"]                  # optional: every other model
    input = 0.50
    output = 1.50

A request costs ``(input - cached) × input + cached × cached_input + output × output`` (per million tokens), and
the cache saved it ``cached × (input - cached_input)``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The entry that prices every model without its own.
ANY_MODEL = "*"
_PER = 1_000_000
_KEYS = ("input", "cached_input", "output")


class PriceFileError(ValueError):
    """An invalid price file; the message names the file, the field and the reason."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices per million tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> float:
        """What one request cost."""
        uncached = input_tokens - cached_tokens
        return (uncached * self.input + cached_tokens * self.cached_input + output_tokens * self.output) / _PER

    def cache_saving(self, cached_tokens: int) -> float:
        """What serving ``cached_tokens`` from the cache saved against paying the full input price."""
        return cached_tokens * (self.input - self.cached_input) / _PER


@dataclass(frozen=True, slots=True)
class Prices:
    """Prices by model name (``*`` for the rest) and the currency they are in."""

    models: dict[str, ModelPrice]
    currency: str = ""

    def of(self, model: str) -> ModelPrice | None:
        """The price of ``model`` (or the ``*`` entry), ``None`` when neither exists."""
        return self.models.get(model) or self.models.get(ANY_MODEL)


def load_prices(path: str | Path) -> Prices:
    """Read a price file (see the module docstring); :class:`PriceFileError` names what is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PriceFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PriceFileError(f"{path}: not UTF-8 text (byte at offset {exc.start})") from None
    except RecursionError:  # tomllib parses nested arrays recursively
        raise PriceFileError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        raise PriceFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        return _prices(data)
    except PriceFileError as exc:
        raise PriceFileError(f"{path}: {exc}") from None


def _prices(data: dict[str, Any]) -> Prices:
    unknown = set(data) - {"currency", "models"}
    if unknown:
        raise PriceFileError(f"unknown key(s) {', '.join(sorted(unknown))} (expected currency and [models.NAME])")
    currency = data.get("currency", "")
    if not isinstance(currency, str):
        raise PriceFileError("currency: must be a string")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise PriceFileError('models: give at least one [models."NAME"] table (or [models."*"])')
    return Prices({name: _model(entry, f"models.{name}") for name, entry in models.items()}, currency)


def _model(entry: Any, field: str) -> ModelPrice:
    if not isinstance(entry, dict):
        raise PriceFileError(f"{field}: must be a table with input, output and optionally cached_input")
    unknown = set(entry) - set(_KEYS)
    if unknown:
        raise PriceFileError(f"{field}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("input", "output"):
        if key not in entry:
            raise PriceFileError(f"{field}: missing {key}")
    values: dict[str, Any] = {key: entry.get(key, entry["input"]) for key in _KEYS}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise PriceFileError(f"{field}.{key}: must be a price ≥ 0 per million tokens, got {value!r}")
    if values["cached_input"] > values["input"]:
        raise PriceFileError(f"{field}.cached_input: {values['cached_input']} is above input ({values['input']})")
    return ModelPrice(float(values["input"]), float(values["cached_input"]), float(values["output"]))
