"""Config loading: defaults, overrides, and clear errors naming file, field and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpath.gateway.chat_template import load_renderer
from llmpath.gateway.config import ConfigError, GatewayConfig, hash_key, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    config = load_config(None)
    assert config == GatewayConfig()
    assert config.routing.policy == "prefix"
    assert config.limits.max_body_bytes == 1_048_576


def test_full_example_loads(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    key = hash_key("sk-test")
    path = write(
        tmp_path,
        f"""
listen: {{host: 0.0.0.0, port: 9000}}
backends:
  - {{url: "http://127.0.0.1:30000", name: a}}
  - {{url: "http://127.0.0.1:30001", kind: openai, weight: 2}}
routing: {{policy: least_load, balance_abs_threshold: 8}}
routes:
  - name: support
    model: tiny
    system_prompt: "You help {{{{ tenant }}}}."
    retriever: {{path: {docs}, top_k: 2}}
    cache: shared
    backends: [a]
api_keys:
  - {{sha256: {key}, tenant: acme, admin: true, rate: {{requests_per_second: 5, burst: 10}}}}
limits: {{max_tokens: 512, default_max_tokens: 64, timeouts: {{read_s: 30}}}}
prompt_cache: {{block_tokens: 32, ttl_s: 60}}
usage: {{ledger: {tmp_path / "usage.jsonl"}}}
""",
    )
    config = load_config(path)
    assert config.listen.port == 9000
    assert [b.display_name for b in config.backends] == ["a", "127.0.0.1:30001"]
    assert config.backends[1].weight == 2
    assert config.routes[0].backend_model == "tiny"
    assert config.api_keys[0].tenant == "acme"
    assert config.api_keys[0].rate is not None and config.api_keys[0].rate.capacity == 10
    assert config.limits.timeouts.read_s == 30
    assert config.prompt_cache.block_tokens == 32


def test_examples_are_valid() -> None:
    examples = Path(__file__).resolve().parents[2] / "gateway" / "examples"
    full = load_config(examples / "gateway.yaml")
    assert [r.cache for r in full.routes] == ["tenant", "tenant", "off"]  # unquoted YAML `off` is understood
    assert full.api_keys[1].admin and full.usage.ledger == examples / "usage.jsonl"  # relative to the file
    assert full.routes[1].retriever is not None and full.routes[1].retriever.path == examples / "knowledge"
    assert load_config(examples / "minimal.yaml").backends[0].display_name == "127.0.0.1:30000"


def test_overrides_merge_into_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: {host: 0.0.0.0, port: 9000}\nrouting: {policy: prefix}\n")
    config = load_config(path, {"listen": {"port": 9100}, "backends": [{"url": "http://127.0.0.1:1"}]})
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9100)
    assert len(config.backends) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routing:\n  policy: fastest\n", "routing.policy (line 2): Input should be 'prefix', 'round_robin'"),
        ("limits:\n  max_bodybytes: 10\n", "limits.max_bodybytes (line 2): unknown field"),
        ("backends:\n  - url: nope\n", "backends[0].url (line 2)"),
        (
            "api_keys:\n  - {sha256: abc, tenant: t}\n",
            "api_keys[0].sha256 (line 2): Value error, must be the 64 hex digits",
        ),
        (
            "limits:\n  max_tokens: 10\n  default_max_tokens: 20\n",
            "limits.default_max_tokens (line 3): default_max_tokens (20) must not exceed max_tokens (10)",
        ),
        (
            "backends: [{url: 'http://a:1'}]\nroutes: [{name: r, backends: [b]}]\n",
            "routes[0].backends (line 2): unknown backend(s) b; known: a:1",
        ),
        ("routes:\n  - {name: r, backends: [b]}\n", "routes[0].backends (line 2): unknown backend(s) b; known: none"),
        (
            "backends:\n  - {url: 'http://a:1'}\n  - {url: 'http://a:1'}\n",
            "backends[1].url (line 3): two backends are named 'a:1' (also backends[0])",
        ),
        ("routes:\n  - name: r\n  - name: r\n", "routes[1].name (line 3): route 'r' is defined twice (also routes[0])"),
        ("backends:\n  - {url: 'http://a:1', name: ''}\n", "backends[0].name (line 2): Value error, must be 1-128"),
        (
            'backends:\n  - {url: "http://a:1", name: "gpu-a\\n"}\n',  # a newline would break log lines
            "backends[0].name (line 2): Value error, must be 1-128 characters",
        ),
        ('routes:\n  - {name: "chat\\n"}\n', "routes[0].name (line 2): Value error, must be 1-128 characters"),
        (
            f'api_keys:\n  - {{sha256: {hash_key("k")}, tenant: "acme\\n"}}\n',
            "api_keys[0].tenant (line 2): Value error, must be 1-128 characters",
        ),
        (
            f"api_keys:\n  - {{sha256: {hash_key('k')}, tenant: a}}\n  - {{sha256: {hash_key('k')}, tenant: b}}\n",
            "api_keys[1].sha256 (line 3): the same key hash as api_keys[0]",
        ),
        (
            "limits: {max_tokens: 64, default_max_tokens: 16}\nroutes:\n  - {name: r, max_tokens: 128}\n",
            "routes[0].max_tokens (line 3): 128 is above limits.max_tokens (64): a route may only lower the global cap",
        ),
        (
            "usage:\n  ledger: usage.csv\n",
            "usage.ledger (line 2): Value error, usage.csv: unknown ledger format ('.csv'); name it .jsonl",
        ),
        (
            "tokenizer: {chat_template: /nonexistent/tokenizer_config.json}\n",
            "tokenizer.chat_template (line 1): /nonexistent/tokenizer_config.json does not exist",
        ),
        (
            "tokenizer:\n  chat_template: chatML\n",
            "tokenizer.chat_template (line 2): unknown chat template 'chatML'; did you mean 'chatml'?",
        ),
        (
            "tokenizer:\n  chat_template: '{% for m in messages %}{{ m.content }'\n",
            "tokenizer.chat_template (line 2): Jinja syntax error at line 1 of the template: unexpected '}'",
        ),
        (
            "tokenizer:\n  chat_template: \"{{ raise_exception('no chats here') }}\"\n",
            "tokenizer.chat_template (line 2): the template refuses a single user message: no chats here",
        ),
        (
            "routes:\n  - {name: ok}\n  - {name: bad, system_prompt: '{% if %}'}\n",
            "routes[1].system_prompt (line 3): template syntax error at line 1: Expected an expression",
        ),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("listen: {port: [\n", "invalid YAML"),
    ],
)
def test_errors_name_file_field_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path))
    assert expected in message


def test_missing_file_and_retriever_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    path = write(tmp_path, f"routes: [{{name: r, retriever: {{path: {tmp_path / 'nope'}}}}}]\n")
    with pytest.raises(ConfigError, match=r"routes\[0\].retriever.path \(line 1\): .* is not a directory"):
        load_config(path)


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_stage_catalog_is_relative_to_the_file_and_checked(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text('[owners]\nroute = "traffic"\n')
    config = load_config(write(tmp_path, "stage_catalog: stages.toml\n"))
    assert config.stage_catalog == tmp_path / "stages.toml"
    (tmp_path / "stages.toml").write_text('[owners]\nrouting = "traffic"\n')
    with pytest.raises(ConfigError, match=r"stage_catalog \(line 1\): .*stages.toml: owners.routing: unknown stage"):
        load_config(write(tmp_path, "stage_catalog: stages.toml\n"))


def test_every_problem_is_listed_with_its_field_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backends:\n  - {url: 'http://a:1', name: a}\n"
        "routes:\n  - {name: r, backends: [nope]}\n  - {name: r, max_tokens: 9000}\n"
        "tokenizer: {chat_template: chatml}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines() == [
        f"{path}: invalid configuration (3 problem(s)):",
        "  routes[1].name (line 5): route 'r' is defined twice (also routes[0])",
        "  routes[0].backends (line 4): unknown backend(s) nope; known: a",
        "  routes[1].max_tokens (line 5): 9000 is above limits.max_tokens (4096): a route may only lower the "
        "global cap",
    ]


def test_a_route_may_lower_the_global_max_tokens(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "limits: {max_tokens: 64, default_max_tokens: 16}\nroutes: [{name: r, max_tokens: 32}]\n")
    )
    assert config.routes[0].max_tokens == 32


@pytest.mark.parametrize("ledger", ["usage.jsonl", "usage.db", "usage.sqlite", "usage.sqlite3"])
def test_ledger_formats(tmp_path: Path, ledger: str) -> None:
    assert load_config(write(tmp_path, f"usage: {{ledger: {ledger}}}\n")).usage.ledger == tmp_path / ledger


def test_chat_template_path_is_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "conf" / "model"
    model.mkdir(parents=True)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the file's folder counts, not the current one
    path = tmp_path / "conf" / "gateway.yaml"
    for value, expected in (("model/tokenizer_config.json", model / "tokenizer_config.json"), ("model", model)):
        path.write_text(f"tokenizer: {{chat_template: {value}}}\n")
        config = load_config(path)
        assert config.tokenizer.chat_template == str(expected)
        render = load_renderer(config.tokenizer.chat_template)
        assert render([{"role": "user", "content": "hi"}]) == "[user] hi\n</s>"
    path.write_text("tokenizer: {chat_template: model/missing.json}\n")
    with pytest.raises(ConfigError, match=rf"chat_template \(line 1\): {model / 'missing.json'} does not exist"):
        load_config(path)
    (model / "template.jinja").write_text(template)
    path.write_text("tokenizer: {chat_template: model/template.jinja}\n")
    with pytest.raises(ConfigError, match="template.jinja is not a tokenizer_config.json"):
        load_config(path)


def test_chat_template_values_that_are_used_as_they_are(tmp_path: Path) -> None:
    inline = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    config = load_config(write(tmp_path, f'tokenizer: {{chat_template: "{inline}"}}\n'))
    assert config.tokenizer.chat_template == inline  # a template is not a path
    assert load_renderer(config.tokenizer.chat_template)([{"role": "user", "content": "a"}]) == "a|"
    assert load_config(write(tmp_path, "tokenizer: {chat_template: chatml}\n")).tokenizer.chat_template == "chatml"


def test_routes_are_checked_with_the_configured_chat_template(tmp_path: Path) -> None:
    """A template that refuses system messages: a route adding one (a system prompt, retrieved context) could never
    serve a request, so the configuration is refused; a route adding none is fine."""
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    strict += "{% endif %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "docs").mkdir()
    path = write(
        tmp_path,
        f'tokenizer: {{chat_template: "{strict}"}}\n'
        "routes:\n"
        "  - {name: plain}\n"
        "  - {name: prompted, system_prompt: 'Be brief.'}\n"
        "  - {name: retrieving, retriever: {path: docs}}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines()[1:] == [
        "  routes[1].system_prompt (line 4): tokenizer.chat_template refuses the messages this route builds "
        "(system, user): System role not supported",
        "  routes[2].retriever (line 5): tokenizer.chat_template refuses the messages this route builds "
        "(system, user): System role not supported",
    ]
