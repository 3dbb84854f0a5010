"""Prompt assembly: sandboxed Jinja2 templates and the folder retriever."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmpath.backends.base import ChatMessage
from llmpath.backends.chat_template import render_chatml
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
