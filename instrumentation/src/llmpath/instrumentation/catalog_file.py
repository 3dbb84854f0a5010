"""A stage catalog in a TOML file, so that the gateway and the generators read the same one.

The gateway passes ``load_catalog(path)`` to ``instrument_app(catalog=...)``; ``llmpath slo``, ``dashboards``,
``runbooks`` and ``usage`` take ``--catalog path``. Then alerts, dashboards, runbooks and the ledger report name the
same owners and stages as the spans::

    # stages.toml
    [owners]                      # the built-in stages' and stage groups' owning teams (any subset)
    route = "traffic"
    cache_lookup = "traffic"
    gateway_overhead = "edge"     # a stage group (the gateway's stages as one duration)

    [[stages]]                    # your own stages
    name = "moderation"
    meaning = "Content moderation: the prompt is checked against the usage policy."
    owner = "trust-safety"
    after = "validate"            # optional: its place in the pipeline (default: before decode, or last)
    groups = ["gateway_overhead"] # optional: stage groups it belongs to
    before_first_token = true     # optional (default true); false: it runs after the first token
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from llmpath.instrumentation.catalog import STAGES, PlacementError, Stage, StageCatalog

_STAGE_KEYS = {"name", "meaning", "owner", "before_first_token", "after", "groups"}


class CatalogFileError(ValueError):
    """An invalid catalog file; the message names the file, the field and the reason."""


def load_catalog(path: str | Path, base: StageCatalog = STAGES) -> StageCatalog:
    """The catalog ``base`` (the built-in stages) with the owners and stages of the TOML file at ``path``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogFileError(f"{path}: cannot read the stage catalog: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        return _catalog(data, base)
    except CatalogFileError as exc:
        raise CatalogFileError(f"{path}: {exc}") from None


def _catalog(data: dict[str, Any], base: StageCatalog) -> StageCatalog:
    unknown = set(data) - {"owners", "stages"}
    if unknown:
        raise CatalogFileError(f"unknown key(s) {', '.join(sorted(unknown))} (expected [owners] and [[stages]])")
    owners = data.get("owners", {})
    if not isinstance(owners, dict):
        raise CatalogFileError("owners: must be a table of stage = team")
    for name in owners:
        if name not in base and base.group(name) is None:
            known = ", ".join([*base.names, *(g.name for g in base.groups)])
            raise CatalogFileError(f"owners.{name}: unknown stage or stage group; known: {known}")
    catalog = base.with_owners({name: _team(team, f"owners.{name}") for name, team in owners.items()})
    stages = data.get("stages", [])
    if not isinstance(stages, list):
        raise CatalogFileError("stages: must be an array of tables ([[stages]])")
    for i, item in enumerate(stages):
        field = f"stages[{i}]"
        stage = _stage(item, field, catalog)
        after, groups = _placement(item, field, catalog)
        try:
            catalog = catalog.with_stage(stage, after=after, groups=groups)
        except PlacementError as exc:
            raise CatalogFileError(f"{field}.after: {exc}") from None
        except ValueError as exc:  # the name: invalid, taken, or a stage group's
            raise CatalogFileError(f"{field}.name: {exc}") from None
    return catalog


def _placement(item: dict[str, Any], field: str, catalog: StageCatalog) -> tuple[str | None, list[str]]:
    after, groups = item.get("after"), item.get("groups", [])
    if after is not None and (not isinstance(after, str) or after not in catalog):
        raise CatalogFileError(f"{field}.after: must name a stage defined before it; known: {', '.join(catalog.names)}")
    if not isinstance(groups, list) or any(catalog.group(g) is None for g in groups):
        known = ", ".join(g.name for g in catalog.groups)
        raise CatalogFileError(f"{field}.groups: must be a list of stage groups; known: {known}")
    return after, groups


def _stage(item: Any, field: str, catalog: StageCatalog) -> Stage:
    if not isinstance(item, dict):
        raise CatalogFileError(f"{field}: must be a table with name, meaning and owner")
    unknown = set(item) - _STAGE_KEYS
    if unknown:
        raise CatalogFileError(f"{field}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = [k for k in ("name", "meaning", "owner") if k not in item]
    if missing:
        raise CatalogFileError(f"{field}: missing {', '.join(missing)}")
    name, meaning = item["name"], item["meaning"]
    before = item.get("before_first_token", True)
    if not isinstance(meaning, str) or not meaning.strip():
        raise CatalogFileError(f"{field}.meaning: must be a non-empty string")
    if not isinstance(before, bool):
        raise CatalogFileError(f"{field}.before_first_token: must be true or false")
    if isinstance(name, str) and name in catalog:
        raise CatalogFileError(f"{field}.name: stage {name!r} already exists (change built-in owners in [owners])")
    return Stage(name, meaning.strip(), _team(item["owner"], f"{field}.owner"), before)


def _team(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CatalogFileError(f"{field}: the owning team must be a non-empty string")
    return value.strip()
