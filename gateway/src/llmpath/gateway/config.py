"""The gateway's configuration: a validated YAML file, with command-line overrides.

Every section has defaults, so an empty file (or no file plus ``--backend``/``--api-key`` flags) is a
working configuration. Unknown keys are errors (typos must not be silently ignored). Errors name the file,
the field path and, where the YAML has one, the line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_EMPTY_KEY_SHA256 = hashlib.sha256(b"").hexdigest()
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
#: A field path (``("routes", 0, "backends")``) and what is wrong there.
Problem = tuple[tuple[str | int, ...], str]
#: Usage-ledger formats by file extension.
LEDGER_FORMATS = {".jsonl": "JSON lines", ".db": "SQLite", ".sqlite": "SQLite", ".sqlite3": "SQLite"}


#: A host name (RFC 1123 labels, an optional final dot; underscores too, as resolvers and container names allow).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be a listen address (an IP address without brackets or a host name), or None.

    An empty one would make uvicorn listen on every interface, which nobody writes on purpose (``0.0.0.0`` says it).
    """
    if not host:
        return "empty: give an address (127.0.0.1, or 0.0.0.0 for every interface)"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            return f"{host!r} is neither an IP address (IPv6 without brackets) nor a host name"
    return None


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is a number (or an optional one)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is Annotated:
        return _is_number(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_number(arg) for arg in typing.get_args(annotation))
    return False


class _Strict(BaseModel):
    # .inf and .nan are YAML numbers, but no limit, timeout, rate or weight can be infinite (an infinite timeout
    # overflows the clients', an infinite rate fails every request); a large finite value says "practically none".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true/false as 1/0, and YAML 1.1 reads yes/no/on/off as booleans: `port: yes` is a mistake.
        name = info.field_name
        if isinstance(value, bool) and name is not None and _is_number(cls.model_fields[name].annotation):
            raise ValueError(f"{str(value).lower()} is not a number (YAML reads yes/no/on/off as true/false)")
        return value


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    #: On SIGTERM or SIGINT the gateway stops accepting connections (``/readyz`` then fails to connect) and gives the
    #: requests in flight — streams included — this many seconds to finish before it cancels them.
    drain_s: NonNegativeFloat = 30.0
    #: Take a well-formed ``X-Request-Id`` sent by the client as the request's id (response header, ledger, spans):
    #: right behind a proxy that sets it; ``false`` where clients connect directly, so they cannot choose the ids.
    trust_request_id: bool = True

    @field_validator("host")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        problem = host_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class BackendConfig(_Strict):
    """One model server behind the gateway."""

    url: AnyHttpUrl
    kind: Literal["sglang", "openai"] = "sglang"
    #: Relative capacity: round_robin sends proportionally more, load comparisons divide by it.
    weight: PositiveFloat = 1.0
    #: Name used in metrics, spans and logs; defaults to ``host:port``.
    name: str | None = None
    #: Name of the environment variable holding the bearer key the gateway sends to this backend, if any.
    api_key_env: str | None = None

    @field_validator("name")
    @classmethod
    def _backend_name(cls, value: str | None) -> str | None:
        # It labels metrics and spans and is shown in logs and on the waterfall page; leave it out for host:port.
        if value is not None and not _NAME_RE.fullmatch(value):
            raise ValueError(
                "must be 1-128 characters of letters, digits and . _ : / - (starting alphanumeric); "
                "leave it out to name the backend host:port"
            )
        return value

    @property
    def display_name(self) -> str:
        return self.name or f"{self.url.host}:{self.url.port}"

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")

    @property
    def public_url(self) -> str:
        """The URL without credentials or query (``https://user:key@host/v1?api-key=…`` → ``https://host/v1``), for
        unauthenticated status pages and logs."""
        return str(URL(self.base_url).with_user(None).with_query(None).with_fragment(None))


class RoutingConfig(_Strict):
    """How a backend is chosen (see docs/gateway.md, "Routing")."""

    policy: Literal["prefix", "round_robin", "least_load"] = "prefix"
    #: prefix: the minimum fraction of the prompt's blocks a backend must hold to win on affinity.
    min_match_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    #: prefix: fall back to the least loaded backend when the affine one has more than this many requests in
    #: flight beyond the least loaded one ...
    balance_abs_threshold: NonNegativeFloat = 4
    #: ... and more than this multiple of its load.
    balance_rel_threshold: Annotated[float, Field(ge=1)] = 1.5
    #: How many times a request is retried on another backend when the connection fails before any byte came.
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2


class HealthConfig(_Strict):
    """Active health checks and passive ejection."""

    interval_s: PositiveFloat = 5.0
    #: SGLang's ``/health`` generates one token and answers after at least a second (and only once some output
    #: came back), so a probe needs more than that; 5 s is sglang-router's ``--health-check-timeout-secs``.
    timeout_s: PositiveFloat = 5.0
    #: Consecutive failures (health checks, connections that failed, 5xx answers) before a backend is ejected.
    eject_after_failures: PositiveInt = 3
    #: How long an ejected backend stays out before it is probed again.
    eject_for_s: PositiveFloat = 30.0


class RetrieverConfig(_Strict):
    """The built-in retriever over a folder of text documents."""

    kind: Literal["folder"] = "folder"
    path: Path
    #: Glob patterns of the files to index, relative to ``path``.
    patterns: tuple[str, ...] = ("**/*.txt", "**/*.md")
    top_k: Annotated[int, Field(ge=1, le=50)] = 3
    #: Documents are split into chunks of about this many characters (on paragraph boundaries).
    chunk_chars: Annotated[int, Field(ge=100, le=100_000)] = 1200
    #: Minimum BM25 score for a chunk to be used.
    min_score: NonNegativeFloat = 0.0

    @field_validator("patterns")
    @classmethod
    def _inside_the_folder(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
                raise ValueError(f"{pattern!r}: a pattern must be relative to path and stay inside it (no '..')")
        return patterns


class RouteConfig(_Strict):
    """A route: what clients send as ``model``, mapped to a backend model and a prompt recipe."""

    name: str
    #: The model name sent to the backend; defaults to the route name.
    model: str | None = None
    #: Jinja2 template (sandboxed) of the system prompt. Variables: ``tenant``, ``route``, ``model``.
    system_prompt: str | None = None
    #: Jinja2 template of the message that carries retrieved documents (``documents``, ``query``).
    context_template: str = (
        "Use the following context to answer.\n"
        "{% for doc in documents %}[{{ doc.source }}]\n{{ doc.text }}\n\n{% endfor %}"
    )
    retriever: RetrieverConfig | None = None
    #: ``tenant``: prefixes are cached per tenant (default); ``shared``: tenants share cached prefixes;
    #: ``off``: nothing is cached or reused for this route.
    cache: Literal["tenant", "shared", "off"] = "tenant"
    #: Names of the backends this route may use; all when empty.
    backends: tuple[str, ...] = ()
    #: Per-route cap of ``max_tokens``: it may only lower ``limits.max_tokens``, never raise it.
    max_tokens: PositiveInt | None = None

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false.
        return "off" if value is False else value

    @field_validator("name")
    @classmethod
    def _route_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must be 1-128 characters of letters, digits and . _ : / - (starting alphanumeric)")
        return value

    @property
    def backend_model(self) -> str:
        return self.model or self.name


class RateConfig(_Strict):
    """A token bucket: ``requests_per_second`` refill, ``burst`` capacity. 0 disables the limit."""

    requests_per_second: NonNegativeFloat = 0.0
    burst: PositiveInt | None = None

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst is not None else max(1.0, self.requests_per_second)

    @property
    def per_second(self) -> float:
        """Refill rate (0: no limit)."""
        return self.requests_per_second


class TokenRateConfig(_Strict):
    """A token budget per tenant, as LLM APIs' "tokens per minute" limits: prompt and output tokens refill at
    ``tokens_per_minute``, up to ``burst`` (default: one minute's worth). 0 disables the limit."""

    tokens_per_minute: NonNegativeFloat = 0.0
    burst: PositiveInt | None = None

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst is not None else max(1.0, self.tokens_per_minute)

    @property
    def per_second(self) -> float:
        """Refill rate (0: no limit)."""
        return self.tokens_per_minute / 60.0


class ApiKeyConfig(_Strict):
    """An API key, stored as the hex sha256 of the key (``llmpath gateway hash-key`` prints it)."""

    sha256: str = Field(repr=False)
    tenant: str
    #: Admin keys may read /debug/requests and flush the prompt cache.
    admin: bool = False
    #: Per-tenant rate override (else ``limits.tenant_rate``).
    rate: RateConfig | None = None
    #: Per-tenant token budget override (else ``limits.tenant_tokens``).
    tokens: TokenRateConfig | None = None

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_RE.match(value):
            raise ValueError("must be the 64 hex digits of the key's sha256 (see `llmpath gateway hash-key`)")
        if value == _EMPTY_KEY_SHA256:
            raise ValueError(
                "is the sha256 of the empty key, which no request can send (see `llmpath gateway hash-key`)"
            )
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must be 1-128 characters of letters, digits and . _ : / - (starting alphanumeric)")
        return value


class TimeoutsConfig(_Strict):
    connect_s: PositiveFloat = 5.0
    #: Longest silence between two chunks from a backend.
    read_s: PositiveFloat = 120.0
    #: Longest a request may wait for admission.
    queue_s: PositiveFloat = 30.0
    #: Longest the request body may take to arrive after its headers (a stalled upload is answered 408).
    body_s: PositiveFloat = 30.0


class LimitsConfig(_Strict):
    max_body_bytes: PositiveInt = 1_048_576
    max_messages: PositiveInt = 512
    #: Estimated prompt tokens (see ``tokenizer.chars_per_token``) of the assembled prompt.
    max_prompt_tokens: PositiveInt = 128_000
    #: Upper bound of ``max_tokens`` / ``max_completion_tokens``.
    max_tokens: PositiveInt = 4096
    #: ``max_tokens`` when the client sends none.
    default_max_tokens: PositiveInt = 256
    max_stop_sequences: Annotated[int, Field(ge=0, le=64)] = 4
    #: Requests running at once in the gateway; more wait in the admission queue.
    max_concurrency: PositiveInt = 64
    #: Requests that may wait for admission; beyond it, 429.
    max_queue: Annotated[int, Field(ge=0)] = 256
    #: Default per-tenant rate limit (off by default).
    tenant_rate: RateConfig = RateConfig()
    #: Default per-tenant token budget (off by default).
    tenant_tokens: TokenRateConfig = TokenRateConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()

    @model_validator(mode="after")
    def _default_within_max(self, info: ValidationInfo) -> LimitsConfig:
        if info.context and info.context.get("defer_cross_checks"):
            return self  # load_config reports it with its field path and line
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(_default_above_max(self))
        return self


def _default_above_max(limits: LimitsConfig) -> str:
    return f"default_max_tokens ({limits.default_max_tokens}) must not exceed max_tokens ({limits.max_tokens})"


class TokenizerConfig(_Strict):
    """The gateway has no model tokenizer: it approximates tokens as characters (UTF-8 bytes) / chars_per_token.

    ``1.0`` is exact for byte-level tokenizers (the embedded engine); about 4 for BPE models on English text.
    """

    chars_per_token: Annotated[float, Field(ge=0.5, le=16)] = 4.0
    #: How chat messages become the backend's prompt text (SGLang's ``/generate`` takes text): ``chatml``
    #: (the embedded engine's), a Jinja chat template (text with ``{{``, ``{%`` or ``{#``), or a model's
    #: ``tokenizer_config.json`` (or its folder); anything else is an error (see
    #: :mod:`llmpath.gateway.chat_template`). The prompt cache hashes exactly this text.
    chat_template: str = "chatml"


class PromptCacheConfig(_Strict):
    """The prompt-caching layer (see docs/prompt-caching.md)."""

    enabled: bool = True
    #: Tokens per block: prefixes are tracked and predicted at this granularity (align with the engine's page).
    block_tokens: Annotated[int, Field(ge=1, le=4096)] = 16
    #: Prompts whose matched prefix is shorter than this are treated as misses (not worth routing for).
    min_prefix_tokens: Annotated[int, Field(ge=0)] = 64
    #: A block not used for this long is forgotten (the engine has likely evicted it).
    ttl_s: PositiveFloat = 600.0
    #: LRU bound of blocks remembered per backend (approximate the engine's KV capacity / block_tokens).
    max_blocks_per_backend: PositiveInt = 65_536


class UsageConfig(_Strict):
    """Usage ledger: one record per finished request (``.jsonl`` → JSON lines, ``.db``/``.sqlite``/``.sqlite3`` →
    SQLite); any other extension is an error."""

    ledger: Path | None = None

    @field_validator("ledger")
    @classmethod
    def _known_format(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() not in LEDGER_FORMATS:
            found = f"{value.suffix!r}" if value.suffix else "no extension"
            raise ValueError(
                f"{value.name}: unknown ledger format ({found}); name it .jsonl (JSON lines) or .db, .sqlite, "
                ".sqlite3 (SQLite)"
            )
        return value


class DebugConfig(_Strict):
    #: How many recent requests the waterfall page keeps in memory.
    waterfall_requests: Annotated[int, Field(ge=1, le=100_000)] = 200


class GatewayConfig(_Strict):
    """The whole gateway configuration (the YAML file's top level)."""

    listen: ListenConfig = ListenConfig()
    backends: tuple[BackendConfig, ...] = ()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    routes: tuple[RouteConfig, ...] = ()
    api_keys: tuple[ApiKeyConfig, ...] = ()
    #: Serve without authentication (every request is tenant ``anonymous``; admin endpoints are open).
    insecure_no_auth: bool = False
    limits: LimitsConfig = LimitsConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    prompt_cache: PromptCacheConfig = PromptCacheConfig()
    usage: UsageConfig = UsageConfig()
    debug: DebugConfig = DebugConfig()
    #: Stage catalog file (TOML, ``llmpath.instrumentation.load_catalog``): the stages' owning teams on spans; give
    #: the same file to ``llmpath slo/dashboards/runbooks --catalog``. Default: the built-in owners.
    stage_catalog: Path | None = None

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> GatewayConfig:
        if info.context and info.context.get("defer_cross_checks"):
            return self  # load_config reports them with their field paths and lines
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(f"{_format_loc(list(loc))}: {msg}" for loc, msg in problems))
        return self


def cross_field_problems(config: GatewayConfig) -> list[Problem]:
    """What no single field shows: defaults above caps, duplicate names, routes naming unknown backends, route caps
    above the global one."""
    problems: list[Problem] = []
    if config.limits.default_max_tokens > config.limits.max_tokens:
        problems.append((("limits", "default_max_tokens"), _default_above_max(config.limits)))
    names = [b.display_name for b in config.backends]
    for j, first in _duplicates(names):
        field = "name" if config.backends[j].name else "url"
        msg = f"two backends are named {names[j]!r} (also backends[{first}]); give them distinct `name`s"
        problems.append((("backends", j, field), msg))
    for j, first in _duplicates([r.name for r in config.routes]):
        problems.append(
            (("routes", j, "name"), f"route {config.routes[j].name!r} is defined twice (also routes[{first}])")
        )
    for j, first in _duplicates([k.sha256 for k in config.api_keys]):
        problems.append((("api_keys", j, "sha256"), f"the same key hash as api_keys[{first}]"))
    known = ", ".join(dict.fromkeys(names)) if names else "none: no backends are configured"
    for i, route in enumerate(config.routes):
        unknown = sorted(set(route.backends) - set(names))
        if unknown:
            problems.append((("routes", i, "backends"), f"unknown backend(s) {', '.join(unknown)}; known: {known}"))
        cap = config.limits.max_tokens
        if route.max_tokens is not None and route.max_tokens > cap:
            msg = f"{route.max_tokens} is above limits.max_tokens ({cap}): a route may only lower the global cap"
            problems.append((("routes", i, "max_tokens"), msg))
    return problems


def _duplicates(values: list[str]) -> list[tuple[int, int]]:
    """(index, index of the first occurrence) of every repeated value."""
    first: dict[str, int] = {}
    out: list[tuple[int, int]] = []
    for i, v in enumerate(values):
        if v in first:
            out.append((i, first[v]))
        else:
            first[v] = i
    return out


def hash_key(key: str) -> str:
    """The hex sha256 of an API key, as stored in ``api_keys[].sha256``."""
    return hashlib.sha256(key.encode()).hexdigest()


class ConfigError(Exception):
    """A configuration problem, already phrased for the user (file, field, line and reason)."""


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> GatewayConfig:
    """Load and validate a YAML config file (or the defaults when ``path`` is None), then apply ``overrides``.

    ``overrides`` are top-level sections merged over the file (a dict merges key by key, anything else
    replaces). Raises :class:`ConfigError` with every problem found.
    """
    data: dict[str, Any] = {}
    root: yaml.Node | None = None
    where = "<command line>"
    found: list[str] = []  # problems reported together: duplicate keys, then the schema's, then the checks' below
    if path is not None:
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{where}: not UTF-8 text (line {line}: byte 0x{raw[exc.start]:02x})") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            loaded = yaml.safe_load(text)
            duplicates = _duplicate_keys(root)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: invalid YAML{_yaml_problem(exc)}") from None
        except RecursionError:  # PyYAML composes recursively: a few hundred nested collections exhaust the stack
            raise ConfigError(f"{where}: invalid YAML: collections nested too deeply") from None
        found = [f"{_format_loc(list(loc))} (line {line}): {msg}" for loc, line, msg in duplicates]
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections (listen, backends, ...)")
        data = loaded
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        config = GatewayConfig.model_validate(data, context={"defer_cross_checks": True})
    except ValidationError as exc:
        raise ConfigError(_report(where, found + _error_lines(exc, root))) from None
    base = path.parent if path is not None else Path()
    templates = _template_problems(config, base)  # before the paths are resolved: errors quote the value as written
    config = _relative_to(config, base)
    found += _problem_lines(cross_field_problems(config) + _file_problems(config) + templates, root)
    if found:
        raise ConfigError(_report(where, found))
    return config


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what the YAML error is, without the excerpt of the file PyYAML quotes (it may hold a backend URL's
    credentials, and reload failures are logged)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f": {exc}"
    mark = exc.problem_mark or exc.context_mark
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    what = ", ".join(str(part) for part in (exc.context, exc.problem) if part)
    return f"{at}: {what}"


def _duplicate_keys(root: yaml.Node | None) -> list[tuple[tuple[str | int, ...], int, str]]:
    """Keys given twice in one mapping (field path, line, reason): YAML keeps the last silently, so the first is a
    setting that is ignored."""
    problems: list[tuple[tuple[str | int, ...], int, str]] = []
    seen: set[int] = set()  # aliases share nodes, and may refer to themselves

    def walk(node: yaml.Node, loc: tuple[str | int, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if isinstance(name, str) and name != "<<":
                    if name in first:
                        msg = f"given twice (also on line {first[name]}); YAML would silently keep only the last"
                        problems.append(((*loc, name), key.start_mark.line + 1, msg))
                    else:
                        first[name] = key.start_mark.line + 1
                walk(value, (*loc, name) if isinstance(name, str) else loc)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))

    if root is not None:
        walk(root, ())
    return problems


def _relative_to(config: GatewayConfig, base: Path) -> GatewayConfig:
    """Relative paths in a file (retriever folders, the ledger, the stage catalog, a chat template's
    tokenizer_config.json) are relative to that file's folder."""
    from llmpath.gateway.chat_template import resolve

    routes = tuple(
        r.model_copy(update={"retriever": r.retriever.model_copy(update={"path": base / r.retriever.path})})
        if r.retriever is not None and not r.retriever.path.is_absolute()
        else r
        for r in config.routes
    )
    ledger = config.usage.ledger
    usage = config.usage
    if ledger is not None and not ledger.is_absolute():
        usage = usage.model_copy(update={"ledger": base / ledger})
    catalog = config.stage_catalog
    if catalog is not None and not catalog.is_absolute():
        catalog = base / catalog
    template = config.tokenizer.chat_template
    tokenizer = config.tokenizer.model_copy(update={"chat_template": resolve(template, base)})
    update = {"routes": routes, "usage": usage, "stage_catalog": catalog, "tokenizer": tokenizer}
    return config.model_copy(update=update)


def _file_problems(config: GatewayConfig) -> list[Problem]:
    """Retriever folders and the stage catalog that do not exist or do not load."""
    problems: list[Problem] = []
    for i, route in enumerate(config.routes):
        if route.retriever is not None and not route.retriever.path.is_dir():
            problems.append((("routes", i, "retriever", "path"), f"{route.retriever.path} is not a directory"))
    ledger = config.usage.ledger
    if ledger is not None:
        problem = _ledger_path_problem(ledger)
        if problem is not None:
            problems.append((("usage", "ledger"), problem))
    if config.stage_catalog is not None:
        from llmpath.instrumentation import CatalogFileError, load_catalog

        try:
            load_catalog(config.stage_catalog)
        except CatalogFileError as exc:
            problems.append((("stage_catalog",), str(exc)))
        except UnicodeDecodeError as exc:
            problems.append(
                (("stage_catalog",), f"{config.stage_catalog}: not UTF-8 text (byte at offset {exc.start})")
            )
        except RecursionError:  # tomllib parses nested arrays recursively
            problems.append((("stage_catalog",), f"{config.stage_catalog}: not valid TOML: nested too deeply"))
    return problems


def _ledger_path_problem(ledger: Path) -> str | None:
    """Why no record could be written at ``ledger`` (the sinks create missing folders, not a file in their way)."""
    if ledger.is_dir():
        return f"{ledger} is a folder; name the ledger file"
    for parent in ledger.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a folder: the ledger cannot be created"
    return None


def _template_problems(config: GatewayConfig, base: Path) -> list[Problem]:
    """The chat template (a relative path is relative to ``base``; it must load and render a user message) and every
    route's templates with it (each rendered once with sample values, the chat template with the messages the route
    adds)."""
    from llmpath.backends.chat_template import Messages, render_chatml
    from llmpath.gateway.assembly import AssemblyError, RouteAssembler
    from llmpath.gateway.chat_template import check_renders, load_renderer

    problems: list[Problem] = []
    render: Callable[[Messages], str] = render_chatml
    try:
        render = load_renderer(config.tokenizer.chat_template, base)
    except ValueError as exc:
        problems.append((("tokenizer", "chat_template"), str(exc)))
    except RecursionError:  # the JSON and Jinja parsers are recursive
        problems.append((("tokenizer", "chat_template"), _TOO_DEEP))
    else:
        failed = check_renders(render)
        if failed:
            problems.append((("tokenizer", "chat_template"), failed))
            render = render_chatml
    for i, route in enumerate(config.routes):
        try:
            RouteAssembler(route, render_chat=render, load_retriever=False)
        except AssemblyError as exc:
            loc: tuple[str | int, ...] = ("routes", i, exc.field)
            if exc.field == "tokenizer.chat_template":
                loc = ("routes", i)
            problems.append((loc, exc.reason))
        except RecursionError:  # Jinja compiles recursively: the route's templates nest too deeply to compile
            problems.append((("routes", i), f"a template of the route: {_TOO_DEEP}"))
    return problems


_TOO_DEEP = "nested too deeply to be parsed (blocks, brackets or JSON arrays)"


def _report(where: str, problems: list[str]) -> str:
    """Every problem of a configuration, one per line under a header naming the file."""
    return "\n".join([f"{where}: invalid configuration ({len(problems)} problem(s)):", *(f"  {p}" for p in problems)])


def _problem_lines(problems: list[Problem], root: yaml.Node | None) -> list[str]:
    lines = []
    for loc, msg in problems:
        line = _line_of(root, list(loc))
        lines.append(f"{_format_loc(list(loc)) or '(top level)'}{f' (line {line})' if line else ''}: {msg}")
    return lines


def _error_lines(exc: ValidationError, root: yaml.Node | None) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = _format_loc(loc) or "(top level)"
        line = _line_of(root, loc)
        at = f" (line {line})" if line else ""
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs/gateway.md)"
        lines.append(f"{field}{at}: {msg}")
    return lines


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line_of(root: yaml.Node | None, loc: list[Any]) -> int | None:
    """The 1-based line of the YAML node at ``loc``, or of its deepest existing parent."""
    node = root
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if node is not None:
                line = node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            node = None
    return line
