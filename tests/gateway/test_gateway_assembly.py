"""Prompt assembly: sandboxed Jinja2 templates and the folder retriever."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmpath.backends.base import ChatMessage
from llmpath.backends.chat_template import render_chatml
from llmpath.backends.template_budget import DEFAULT_LIMITS, BudgetedSandbox, RenderBudgetExceeded, render_within
from llmpath.gateway.assembly import (
    AssemblyError,
    FolderRetriever,
    MessagesRejected,
    RouteAssembler,
    render_messages,
)
from llmpath.gateway.chat_template import load_renderer
from llmpath.gateway.config import RetrieverConfig, RouteConfig


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "refunds.md").write_text(
        "# Refunds\n\nRefunds are issued within 14 days of purchase.\n\nContact billing for refund questions."
    )
    (tmp_path / "sub" / "shipping.txt").write_text("Shipping takes 3 to 5 business days.\n\nWe ship worldwide.")
    (tmp_path / "ignored.bin").write_text("refund refund refund")
    return tmp_path


def test_folder_retriever_ranks_by_bm25(corpus: Path) -> None:
    retriever = FolderRetriever(RetrieverConfig(path=corpus, top_k=2, chunk_chars=100))
    assert len(retriever) == 2  # one chunk per (short) file
    docs = retriever.retrieve("how long do refunds take?")
    assert docs and docs[0].source == "refunds.md" and "14 days" in docs[0].text
    assert all(d.source != "ignored.bin" for d in docs)
    assert retriever.retrieve("shipping worldwide")[0].source == "sub/shipping.txt"
    assert retriever.retrieve("zebra") == []


def test_bm25_scores_follow_the_formula(corpus: Path) -> None:
    """Okapi BM25 (k1=1.2, b=0.75, idf = ln(1 + (N − df + 0.5)/(df + 0.5))) computed by hand for two chunks."""
    retriever = FolderRetriever(RetrieverConfig(path=corpus, top_k=2, chunk_chars=100))
    [doc] = retriever.retrieve("billing")
    n, df, tf, length = 2, 1, 1, 14  # "billing": in 1 of the 2 chunks; 14 terms in the refunds chunk
    avg = (14 + 10) / 2  # and 10 in the shipping one
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    assert doc.score == pytest.approx(idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * length / avg)))


def test_a_long_query_is_bounded_to_its_end(corpus: Path) -> None:
    """A pasted document followed by the question: only the last 4,096 characters, 256 distinct terms, count."""
    retriever = FolderRetriever(RetrieverConfig(path=corpus, top_k=1))
    noise = " ".join(f"w{i}" for i in range(100_000))
    assert retriever.retrieve("shipping " + noise + " refunds")[0].source == "refunds.md"
    assert retriever.retrieve("refunds " + noise) == []  # the start of a long message is not the query
    terms = " ".join(f"t{i}" for i in range(300))
    assert retriever.retrieve(f"{terms} shipping")[0].source == "sub/shipping.txt"
    assert retriever.retrieve(f"shipping {terms}") == []  # 300 distinct terms after it: past the last 256


def test_the_retriever_stays_inside_its_folder(tmp_path: Path) -> None:
    docs, outside = tmp_path / "docs", tmp_path / "secret.txt"
    docs.mkdir()
    outside.write_text("TOPSECRET refunds")
    (docs / "a.txt").write_text("refunds policy")
    (docs / "link.txt").symlink_to(outside)
    retriever = FolderRetriever(RetrieverConfig(path=docs))
    assert [d.source for d in retriever.retrieve("refunds", k=5)] == ["a.txt"]
    for pattern in ("../*.txt", "/etc/*.conf", "sub/../../*.txt"):
        with pytest.raises(ValueError, match="stay inside it"):
            RetrieverConfig(path=docs, patterns=(pattern,))


def test_long_documents_are_chunked_on_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"paragraph {i} " + "word " * 30 for i in range(10)]
    (tmp_path / "long.txt").write_text("\n\n".join(paragraphs) + "\n\n" + "x" * 450)
    retriever = FolderRetriever(RetrieverConfig(path=tmp_path, chunk_chars=400))
    assert len(retriever) == 7  # 5 chunks of 2 paragraphs; the 450-char run cut hard at 400 (+ 50)
    chunks = [d.text for d in retriever.retrieve("paragraph word", k=50)]
    assert len(chunks) == 5 and all(len(c) <= 400 and c.count("paragraph") == 2 for c in chunks)


def test_folder_retriever_reloads_changed_files(corpus: Path) -> None:
    retriever = FolderRetriever(RetrieverConfig(path=corpus), refresh_s=0)
    assert retriever.retrieve("warranty") == []
    (corpus / "warranty.txt").write_text("The warranty lasts two years.")
    assert retriever.retrieve("warranty")[0].source == "warranty.txt"


def test_chat_assembly_order_keeps_the_prefix_stable(corpus: Path) -> None:
    route = RouteConfig(
        name="support",
        system_prompt="You are the support bot of {{ tenant }} on route {{ route }}.",
        retriever=RetrieverConfig(path=corpus, top_k=1),
    )
    asm = RouteAssembler(route)
    history = [ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "refunds?")]
    out = asm.assemble_chat(history, tenant="acme")
    assert out.messages is not None
    assert [m.role for m in out.messages] == ["system", "user", "assistant", "system", "user"]
    assert out.messages[0].content == "You are the support bot of acme on route support."
    assert "[refunds.md]" in out.messages[3].content and "14 days" in out.messages[3].content
    assert out.system_prompt and len(out.documents) == 1
    assert out.cache_text == render_messages(render_chatml, out.messages)  # what the engine will tokenize
    assert out.cache_text.startswith("<|im_start|>system\nYou are the support bot of acme")
    # the system prompt + history is a prefix of the text: only the retrieved context varies per question
    prefix = render_chatml([{"role": m.role, "content": m.content} for m in out.messages[:3]], False)
    assert out.cache_text.startswith(prefix)


def test_completion_assembly() -> None:
    asm = RouteAssembler(RouteConfig(name="c", system_prompt="SYS"))
    out = asm.assemble_completion("Once upon a time", tenant="t")
    assert out.prompt == "SYS\n\nOnce upon a time" and out.messages is None
    assert RouteAssembler(RouteConfig(name="plain")).assemble_completion("p", tenant="t").prompt == "p"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% if %}", "template syntax error"),
        ("{{ undefined_variable }}", "failed to render"),
        ("{{ tenant.__class__.__mro__ }}", "failed to render"),  # the sandbox refuses internals
        ("{{ ''.__class__ }}", "failed to render"),
    ],
)
def test_bad_templates_fail_at_startup(template: str, message: str) -> None:
    with pytest.raises(AssemblyError, match=message):
        RouteAssembler(RouteConfig(name="bad", system_prompt=template))


def test_sandbox_blocks_mutation() -> None:
    route = RouteConfig(name="m", system_prompt="{% set x = [1] %}{{ x.append(2) }}")
    with pytest.raises(AssemblyError):
        RouteAssembler(route)


def test_a_template_failing_for_one_tenant_is_an_assembly_error() -> None:
    """Any exception while rendering (here a ZeroDivisionError for 4-letter tenants) becomes an AssemblyError naming
    the route, field, exception and template line; the template fails again on the next request (not cached)."""
    asm = RouteAssembler(RouteConfig(name="sp", system_prompt="{{ 10 // (tenant|length - 4) }}"))
    assert asm.assemble_completion("p", tenant="tenant").prompt == "5\n\np"
    for _ in range(2):
        with pytest.raises(AssemblyError) as err:
            asm.assemble_chat([ChatMessage("user", "hi")], tenant="acme")
        assert str(err.value) == (
            "route 'sp': system_prompt: template failed to render: ZeroDivisionError at line 1 of the template: "
            "integer division or modulo by zero"
        )
        assert err.value.field == "system_prompt"


def test_run_time_errors_of_templates_given_prompt_text_do_not_quote_it(corpus: Path) -> None:
    """The context template sees the query and the chat template the messages: their errors name the exception and
    the line only, since an exception's message may quote a value."""
    route = RouteConfig(
        name="docs",
        retriever=RetrieverConfig(path=corpus, top_k=1),
        # Jinja's message would be "'list object' has no attribute '<the query>'"
        context_template="{{ documents[0].text }}\n{% if 'SECRET' in query %}{{ documents[query] }}{% endif %}",
    )
    asm = RouteAssembler(route)
    with pytest.raises(AssemblyError) as err:
        asm.assemble_chat([ChatMessage("user", "refunds SECRET-PROMPT")], tenant="t")
    assert err.value.field == "context_template"
    assert "SECRET" not in str(err.value) and "at line 2 of the template" in str(err.value)

    def crashing(messages):  # a chat template whose error message quotes the prompt
        if any("SECRET" in m["content"] for m in messages):
            raise KeyError(messages[-1]["content"])
        return render_chatml(messages)

    asm = RouteAssembler(RouteConfig(name="c"), render_chat=crashing)
    with pytest.raises(AssemblyError) as err:
        asm.assemble_chat([ChatMessage("user", "SECRET-PROMPT")], tenant="t")
    assert str(err.value) == "route 'c': tokenizer.chat_template: the chat template failed to render: KeyError"


def test_a_chat_template_refusing_the_messages_is_the_clients_error() -> None:
    strict = load_renderer(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    asm = RouteAssembler(RouteConfig(name="plain"), render_chat=strict)
    assert asm.assemble_chat([ChatMessage("user", "hi")], tenant="t").cache_text == "[user] hi\n"
    with pytest.raises(MessagesRejected, match="^System role not supported$"):
        asm.assemble_chat([ChatMessage("system", "be brief"), ChatMessage("user", "hi")], tenant="t")
    # a route that adds a system message itself could never serve a request: refused at startup
    with pytest.raises(AssemblyError, match=r"system_prompt: tokenizer.chat_template refuses .* \(system, user\)"):
        RouteAssembler(RouteConfig(name="prompted", system_prompt="Be brief."), render_chat=strict)


STEPS = (
    "template exceeded its render budget (1,000,000 steps: loop iterations, range() items, lookups, operators, "
    "filters and calls)"
)
CHARS = "template exceeded its render budget (32,000,000 characters of output and of the strings and lists it builds)"
BITS = "template exceeded its render budget (a number over 65,536 bits)"
NESTED_RANGES = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (NESTED_RANGES, STEPS),  # 10**10 iterations
        ("{% set r = range(100000) %}{% for i in r %}{% for c in 'x' * 100000 %}{% endfor %}{% endfor %}", STEPS),
        ("{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(40) }}", STEPS),
        ("{% for i in range(100000) %}{{ loop.index }}{{ tenant.upper() }}{% endfor %}" * 10, STEPS),
        ("{{ 'x' * 10**9 }}", CHARS),
        ("{{ [0] * 10**9 }}", CHARS),
        ("{{ 9 ** (9 ** 9) }}", BITS),  # Jinja's ** is left-associative: 9**9**9 is (9**9)**9, a small number
        ("{{ 2 ** 1000000000 }}", BITS),
        ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", BITS),
        ("{% for i in range(100000) %}" + "x" * 400 + "{% endfor %}", CHARS),  # 40,000,000 characters of output
        ("{% set s %}{% for i in range(100000) %}" + "x" * 400 + "{% endfor %}{% endset %}", CHARS),  # captured
        ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", CHARS),
        ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", CHARS),
        ("{{ 'x'.ljust(10**9) }}", CHARS),
        ("{{ '{:>1000000000}'.format(tenant) }}", CHARS),
        ("{{ '%*s' % (10**9, tenant) }}", CHARS),
        ("{{ ('x' * 1000)|replace('x', 'y' * 100000) }}", CHARS),
        ("{{ ('a\\n' * 1000)|indent(10**6) }}", CHARS),
        ("{{ tenant|center(10**9) }}", CHARS),
        ("{{ [1]|batch(10**9, 0)|list }}", CHARS),
        ("{{ lipsum(10**6) }}", CHARS),
    ],
)
def test_runaway_templates_fail_fast_with_the_budgets_reason(template: str, reason: str) -> None:
    """Loops, recursion, repetition, powers, output and the ways of making long strings each stop at the render
    budget (Jinja's sandbox alone ran them for hours or until memory ran out): an AssemblyError at construction
    naming the field, the limit and the template's line (none for the output, counted as it is joined)."""
    with pytest.raises(AssemblyError) as err:
        RouteAssembler(RouteConfig(name="runaway", system_prompt=template))
    assert err.value.field == "system_prompt"
    assert err.value.reason in (reason, f"{reason} at line 1 of the template")


def test_a_template_over_its_budget_for_one_tenant_fails_each_request() -> None:
    """The render budget is per render: the same error each time, and other tenants' renders are unaffected."""
    within = "{% for i in range(100000) %}{% endfor %}" * 4
    template = "{% if tenant|length == 4 %}" + NESTED_RANGES + "{% endif %}" + within
    asm = RouteAssembler(RouteConfig(name="sp", system_prompt=template))
    for _ in range(2):
        with pytest.raises(AssemblyError) as err:
            asm.assemble_chat([ChatMessage("user", "hi")], tenant="acme")
        assert str(err.value) == f"route 'sp': system_prompt: {STEPS} at line 1 of the template"
    for _ in range(2):  # 800,000 steps each (a range's items, and the loop's): within the budget
        assert asm.assemble_completion("p", tenant="tenant").prompt == "p"


def test_chat_templates_render_within_a_budget_too() -> None:
    """The tokenizer's chat template: refused at construction when it runs away on the route's messages; at run
    time a 500 (AssemblyError) whose reason names the limit, not the messages."""
    runaway = load_renderer("{% for m in messages %}" + NESTED_RANGES + "{{ m['content'] }}{% endfor %}")
    with pytest.raises(AssemblyError) as err:
        RouteAssembler(RouteConfig(name="plain"), render_chat=runaway)
    steps = STEPS.replace("1,000,000", "1,001,000")  # one message adds 1,000 steps
    assert err.value.reason == f"tokenizer.chat_template, given the messages this route builds (user): {steps}"
    on_demand = load_renderer("{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ m['content'] * 10**9 }}"
                              "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")  # fmt: skip
    asm = RouteAssembler(RouteConfig(name="plain"), render_chat=on_demand)
    assert asm.assemble_chat([ChatMessage("user", "hi")], tenant="t").cache_text == "[user] hi\n"
    with pytest.raises(AssemblyError) as err:
        asm.assemble_chat([ChatMessage("user", "SECRET-BOOM")], tenant="t")
    assert err.value.field == "tokenizer.chat_template" and "SECRET" not in str(err.value)
    assert err.value.reason.startswith("the chat template failed to render: template exceeded its render budget (32,0")
    assert err.value.reason.endswith(" at line 1 of the template")


def test_the_budget_grows_with_the_conversation() -> None:
    """A chat template over 20,000 messages takes more than the 1,000,000 steps a render starts with (a loop item,
    lookups and two calls per message): each message adds 1,000."""
    template = "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'].strip() }}\n{% endfor %}"
    messages = [{"role": "user", "content": f" {i} "} for i in range(20_000)]
    with pytest.raises(RenderBudgetExceeded):
        render_within(BudgetedSandbox().from_string(template), DEFAULT_LIMITS, messages=messages)
    assert load_renderer(template)(messages) == "".join(f"USER: {i}\n" for i in range(20_000))


def test_valid_templates_with_loops_render_as_in_jinjas_sandbox(corpus: Path) -> None:
    """Loops over the retrieved documents, loop variables, filters, macros, ``~``, ``%``, ``format`` and ranges: the
    budgeted sandbox renders exactly what Jinja's own sandbox renders."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    context = (
        "{% macro cite(d) %}[{{ d.source }}] {{ d.text|trim|replace('\\n', ' ') }}{% endmacro %}"
        "Context for {{ query|upper }} ({{ documents|length }} documents):\n"
        "{% for d in documents %}{{ loop.index }}. {{ cite(d) }} ({{ '%.2f'|format(d.score) }}, "
        "{{ '{:>6}'.format(d.score|round(1)) ~ '|' }}){% if not loop.last %}\n{% endif %}{% endfor %}\n"
        "{% for i in range(3) %}{{ '-' * (i + 1) + '>' }}{{ [i] * 2 }}{% endfor %}"
        "{{ 2 ** 10 }} {{ '%s/%d' % (route, 7) }}"
    )
    route = RouteConfig(name="docs", retriever=RetrieverConfig(path=corpus, top_k=2), context_template=context)
    out = RouteAssembler(route).assemble_chat([ChatMessage("user", "refunds and shipping?")], tenant="t")
    assert out.messages is not None and len(out.documents) == 2
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    variables = {"documents": out.documents, "query": "refunds and shipping?", "route": "docs", "model": None}
    expected = jinja.from_string(context).render(**variables)
    assert expected == (
        "Context for REFUNDS AND SHIPPING? (2 documents):\n"
        "1. [refunds.md] # Refunds  Refunds are issued within 14 days of purchase.  Contact billing for refund "
        "questions. (0.91,    0.9|)\n"
        "2. [sub/shipping.txt] Shipping takes 3 to 5 business days.  We ship worldwide. (0.74,    0.7|)\n"
        "->[0, 0]-->[1, 1]--->[2, 2]1024 docs/7"
    )
    assert out.messages[0].content == expected
