"""Config loading: defaults, overrides, and clear errors naming file, field and line."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        ("limits: {max_tokens: 10, default_max_tokens: 20}\n", "default_max_tokens (20) must not exceed"),
        (
            "backends: [{url: 'http://a:1'}]\nroutes: [{name: r, backends: [b]}]\n",
            "routes[0].backends: unknown backend(s) b",
        ),
        ("backends: [{url: 'http://a:1'}, {url: 'http://a:1'}]\n", "two backends are named 'a:1'"),
        ("tokenizer: {chat_template: /nonexistent/tokenizer_config.json}\n", "tokenizer.chat_template: "),
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
    with pytest.raises(ConfigError, match=r"routes\[0\].retriever.path: .* is not a directory"):
        load_config(path)


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_stage_catalog_is_relative_to_the_file_and_checked(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text('[owners]\nroute = "traffic"\n')
    config = load_config(write(tmp_path, "stage_catalog: stages.toml\n"))
    assert config.stage_catalog == tmp_path / "stages.toml"
    (tmp_path / "stages.toml").write_text('[owners]\nrouting = "traffic"\n')
    with pytest.raises(ConfigError, match=r"stage_catalog: .*stages.toml: owners.routing: unknown stage"):
        load_config(write(tmp_path, "stage_catalog: stages.toml\n"))
