"""Stage ``assemble``: retrieval and prompt assembly.

A route may add a system prompt (a sandboxed Jinja2 template) and retrieved context. The order keeps
prompts cache-friendly: the stable system prompt first, the client's conversation next, and the retrieved
context (which changes with every question) as a system message just before the last user message, so that
everything before it stays a reusable prefix.

Templates render in :class:`~llmpath.backends.template_budget.BudgetedSandbox`: Jinja's immutable sandbox with a
budget for each render (1,000,000 steps of loops, lookups and calls; 32,000,000 characters of output and of the
strings it builds; integers of at most 65,536 bits; the context template gets more for long documents and
queries), so that a runaway template fails with an :class:`AssemblyError` instead of hanging the gateway.

The :class:`Retriever` protocol has one built-in implementation, :class:`FolderRetriever`: BM25 over
paragraph chunks of the text files in a local folder, reloaded when the files change.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from jinja2 import StrictUndefined, Template, TemplateSyntaxError

from llmpath.backends.base import ChatMessage
from llmpath.backends.chat_template import Messages, render_chatml
from llmpath.backends.template_budget import (
    DEFAULT_LIMITS,
    BudgetedSandbox,
    RenderBudgetExceeded,
    RenderLimits,
    render_within,
)
from llmpath.gateway.chat_template import ChatTemplateRejected
from llmpath.gateway.config import RetrieverConfig, RouteConfig

_WORD_RE = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class Document:
    """A retrieved chunk: where it came from, its text and its score."""

    source: str
    text: str
    score: float


@runtime_checkable
class Retriever(Protocol):
    """Finds documents relevant to a query."""

    def retrieve(self, query: str, k: int) -> list[Document]: ...


#: The query a retriever scores: the end of the text (where a question follows pasted material) and at most this
#: many distinct terms, so that a long message costs the event loop a bounded time.
MAX_QUERY_CHARS = 4096
MAX_QUERY_TERMS = 256


class FolderRetriever:
    """BM25 (k1=1.2, b=0.75) over paragraph chunks of the text files under a folder.

    Files are read at construction and re-read when their modification times change (checked at most every
    ``refresh_s`` seconds). Only files inside the folder are read: a symbolic link that leads out of it is
    skipped. Scoring walks an inverted index (term → chunks), so a query costs what its matching chunks cost.
    """

    k1 = 1.2
    b = 0.75

    def __init__(self, config: RetrieverConfig, *, refresh_s: float = 5.0) -> None:
        self.config = config
        self.refresh_s = refresh_s
        self._checked = 0.0
        self._fingerprint: tuple[tuple[str, float, int], ...] = ()
        self._chunks: list[tuple[str, str, int]] = []
        #: term → (inverse document frequency, [(chunk index, term frequency)]).
        self._postings: dict[str, tuple[float, list[tuple[int, int]]]] = {}
        self._avg_len = 1.0
        self._load()

    def __len__(self) -> int:
        return len(self._chunks)

    def retrieve(self, query: str, k: int | None = None) -> list[Document]:
        """The top ``k`` chunks for ``query`` (``config.top_k`` by default), best first. The query is its last
        :data:`MAX_QUERY_CHARS` characters, and of those its last :data:`MAX_QUERY_TERMS` distinct terms."""
        self._maybe_reload()
        k = k or self.config.top_k
        terms = list(dict.fromkeys(reversed(_terms(query[-MAX_QUERY_CHARS:]))))[:MAX_QUERY_TERMS]  # the last ones
        if not terms or not self._chunks:
            return []
        k1, b, avg = self.k1, self.b, self._avg_len
        scores: dict[int, float] = {}
        for term in terms:
            entry = self._postings.get(term)
            if entry is None:
                continue
            idf, postings = entry
            for i, f in postings:
                norm = k1 * (1 - b + b * self._chunks[i][2] / avg)
                scores[i] = scores.get(i, 0.0) + idf * f * (k1 + 1) / (f + norm)
        scored = [(s, i) for i, s in scores.items() if s > self.config.min_score and s > 0]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [Document(self._chunks[i][0], self._chunks[i][1], s) for s, i in scored[:k]]

    def _files(self) -> list[Path]:
        root = self.config.path
        resolved = root.resolve()
        found = {
            p
            for pattern in self.config.patterns
            for p in root.glob(pattern)
            if p.is_file() and p.resolve().is_relative_to(resolved)  # no link (or "..") out of the folder
        }
        return sorted(found)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.refresh_s:
            return
        self._checked = now
        if self._stat() != self._fingerprint:
            self._load()

    def _stat(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for p in self._files():
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p), st.st_mtime, st.st_size))
        return tuple(out)

    def _load(self) -> None:
        self._checked = time.monotonic()
        self._fingerprint = self._stat()
        chunks: list[tuple[str, str, int]] = []
        by_term: dict[str, list[tuple[int, int]]] = {}
        root = self.config.path
        for name, _, _ in self._fingerprint:
            path = Path(name)
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            source = str(path.relative_to(root))
            for chunk in _chunk(text, self.config.chunk_chars):
                terms = _terms(chunk)
                if terms:
                    for term, f in Counter(terms).items():
                        by_term.setdefault(term, []).append((len(chunks), f))
                    chunks.append((source, chunk, len(terms)))
        n = len(chunks)
        self._chunks = chunks
        self._postings = {
            term: (math.log(1 + (n - len(posts) + 0.5) / (len(posts) + 0.5)), posts) for term, posts in by_term.items()
        }
        self._avg_len = sum(c[2] for c in chunks) / n if chunks else 1.0


def _terms(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _chunk(text: str, size: int) -> list[str]:
    """Split on blank lines, packing paragraphs into chunks of at most about ``size`` characters."""
    out: list[str] = []
    current: list[str] = []
    length = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        while len(para) > size:  # a huge paragraph is cut hard
            if current:
                out.append("\n\n".join(current))
                current, length = [], 0
            out.append(para[:size])
            para = para[size:]
        if length + len(para) > size and current:
            out.append("\n\n".join(current))
            current, length = [], 0
        current.append(para)
        length += len(para) + 2
    if current:
        out.append("\n\n".join(current))
    return out


class AssemblyError(Exception):
    """A route's template failed to compile or render: a configuration problem, never the client's. ``field`` is the
    route's field to blame (``system_prompt``, ``context_template``, ``retriever``), ``reason`` what went wrong;
    neither contains prompt text."""

    def __init__(self, route: str, field: str, reason: str) -> None:
        super().__init__(f"route {route!r}: {field}: {reason}")
        self.route = route
        self.field = field
        self.reason = reason


class MessagesRejected(Exception):
    """The chat template refused the request's messages (its ``raise_exception(...)``): the client's to fix."""


@dataclass(frozen=True, slots=True)
class Assembled:
    """The prompt to send: chat messages or text, plus what went into it (for spans and the waterfall)."""

    messages: list[ChatMessage] | None
    prompt: str | None
    #: The text the prefix cache hashes: the prompt exactly as the backend will see it (chat template applied).
    cache_text: str
    documents: tuple[Document, ...]
    system_prompt: bool


class RouteAssembler:
    """Renders one route's templates (compiled once, sandboxed, each render within a budget) and calls its retriever.

    Every template is rendered once at construction with sample values, and the chat template with the messages
    the route adds, so that a broken route fails at startup (:class:`AssemblyError`), as does one over its render
    budget. At run time any exception while rendering becomes an :class:`AssemblyError` (a 500) whose reason
    carries no prompt text, except the chat template's ``raise_exception(...)``, which is :class:`MessagesRejected`
    (a 400). ``load_retriever=False`` checks the templates without indexing the retriever's folder.
    """

    _env = BudgetedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)

    def __init__(
        self,
        route: RouteConfig,
        retriever: Retriever | None = None,
        render_chat: Callable[[Messages], str] = render_chatml,
        *,
        load_retriever: bool = True,
    ) -> None:
        self.route = route
        self.render_chat = render_chat
        self._system = self._compile("system_prompt", route.system_prompt) if route.system_prompt else None
        self._context = self._compile("context_template", route.context_template)
        if retriever is None and route.retriever is not None and load_retriever:
            retriever = FolderRetriever(route.retriever)
        self.retriever = retriever
        self._system_cache: dict[str, str] = {}
        self._check()

    def assemble_chat(self, messages: Sequence[ChatMessage], *, tenant: str) -> Assembled:
        out = list(messages)
        system = self._render_system(tenant)
        if system:
            out.insert(0, ChatMessage("system", system))
        documents: tuple[Document, ...] = ()
        if self.retriever is not None:
            last_user = next((i for i in range(len(out) - 1, -1, -1) if out[i].role == "user"), None)
            if last_user is not None:
                documents = tuple(self.retriever.retrieve(out[last_user].content, self._top_k()))
                if documents:
                    context = self._render_context(documents, out[last_user].content)
                    out.insert(last_user, ChatMessage("system", context))
        return Assembled(out, None, self.chat_text(out), documents, bool(system))

    def assemble_completion(self, prompt: str, *, tenant: str) -> Assembled:
        parts: list[str] = []
        system = self._render_system(tenant)
        if system:
            parts.append(system)
        documents: tuple[Document, ...] = ()
        if self.retriever is not None:
            documents = tuple(self.retriever.retrieve(prompt, self._top_k()))
            if documents:
                parts.append(self._render_context(documents, prompt))
        parts.append(prompt)
        text = "\n\n".join(parts) if len(parts) > 1 else prompt
        return Assembled(None, text, text, documents, bool(system))

    def chat_text(self, messages: Sequence[ChatMessage]) -> str:
        """``messages`` rendered with the chat template; raises :class:`MessagesRejected` when the template refuses
        them, :class:`AssemblyError` when it fails (the reason names the exception and the template's line only:
        the messages are prompt text)."""
        try:
            return render_messages(self.render_chat, messages)
        except ChatTemplateRejected as exc:
            raise MessagesRejected(str(exc)) from None
        except Exception as exc:  # any failure of a configured template is the gateway's 500
            raise AssemblyError(
                self.route.name, "tokenizer.chat_template", f"the chat template failed to render: {_describe(exc)}"
            ) from None

    def _check(self) -> None:
        """Render every template once with sample values, and the chat template with the messages this route adds
        (its system prompt, its retrieved context) before a user message."""
        sample: list[ChatMessage] = []
        system = self._render_system("example-tenant")
        if system:
            sample.append(ChatMessage("system", system))
        context = self._render_context([Document("example.txt", "example", 1.0)], "example question", sample=True)
        if self.route.retriever is not None:
            sample.append(ChatMessage("system", context))
        sample.append(ChatMessage("user", "example question"))
        blame = "system_prompt" if system else "retriever" if self.route.retriever is not None else ""
        try:
            render_messages(self.render_chat, sample)
        except Exception as exc:  # reported as the route's configuration problem
            roles = ", ".join(m.role for m in sample)
            if isinstance(exc, RenderBudgetExceeded):
                reason = f"tokenizer.chat_template, given the messages this route builds ({roles}): {exc}"
            else:
                what = exc if isinstance(exc, ChatTemplateRejected) else f"{type(exc).__name__}: {exc}"
                reason = f"tokenizer.chat_template refuses the messages this route builds ({roles}): {what}"
            raise AssemblyError(self.route.name, blame or "tokenizer.chat_template", reason) from None

    def _compile(self, field: str, source: str) -> Template:
        try:
            return self._env.from_string(source)
        except TemplateSyntaxError as exc:
            reason = f"template syntax error at line {exc.lineno}: {exc.message}"
            raise AssemblyError(self.route.name, field, reason) from None

    def _top_k(self) -> int:
        return self.route.retriever.top_k if self.route.retriever else 3

    def _render_system(self, tenant: str) -> str:
        if self._system is None:
            return ""
        cached = self._system_cache.get(tenant)
        if cached is None:
            # Its variables (tenant, route, model) are no prompt text: the exception's message may be shown.
            variables = {"tenant": tenant, "route": self.route.name, "model": self.route.backend_model}
            cached = self._render(self._system, "system_prompt", variables, with_message=True)
            if len(self._system_cache) < 10_000:
                self._system_cache[tenant] = cached
        return cached

    def _render_context(self, documents: Sequence[Document], query: str, *, sample: bool = False) -> str:
        variables = {
            "documents": documents,
            "query": query,
            "route": self.route.name,
            "model": self.route.backend_model,
        }
        # Long documents and queries take a longer render: the budget grows with them.
        limits = DEFAULT_LIMITS.plus(items=len(documents), chars=len(query) + sum(len(d.text) for d in documents))
        # The query is prompt text, and an exception's message may quote it: shown only for the sample values.
        return self._render(self._context, "context_template", variables, with_message=sample, limits=limits)

    def _render(
        self,
        template: Template,
        field: str,
        variables: Mapping[str, object],
        *,
        with_message: bool,
        limits: RenderLimits = DEFAULT_LIMITS,
    ) -> str:
        try:
            return render_within(template, limits, **variables)
        except RenderBudgetExceeded as exc:  # its reason names the limit it went over
            raise AssemblyError(self.route.name, field, _describe(exc)) from None
        except Exception as exc:  # any failure of a configured template is the gateway's 500
            reason = f"template failed to render: {_describe(exc, with_message=with_message)}"
            raise AssemblyError(self.route.name, field, reason) from None


def _describe(exc: BaseException, *, with_message: bool = False) -> str:
    """The exception's type and the template line it came from (and its message when it cannot hold prompt
    text); for a render over its budget, the budget's reason (which names a limit, never a value) and the line."""
    line = None
    tb = exc.__traceback__
    while tb is not None:  # Jinja rewrites tracebacks so that template frames are "<template>" at the template line
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" at line {line} of the template" if line is not None else ""
    if isinstance(exc, RenderBudgetExceeded):
        return f"{exc}{where}"
    message = f": {exc}" if with_message and str(exc) else ""
    return f"{type(exc).__name__}{where}{message}"


def render_messages(render_chat: Callable[[Messages], str], messages: Sequence[ChatMessage]) -> str:
    """The conversation rendered with the backend's chat template (what the backend tokenizes)."""
    return render_chat([{"role": m.role, "content": m.content} for m in messages])
