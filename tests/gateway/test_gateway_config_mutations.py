"""The documented example configuration, mutated one field at a time: a bad value is a :class:`ConfigError` naming
the file, the field and its line (never another exception), and exotic YAML is refused with the line, never with
an excerpt of the file (a backend URL may carry credentials, and reload failures are logged)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpath.gateway.config import ConfigError, hash_key, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "examples" / "gateway.yaml"
BASE: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())


def leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, i))
    else:
        yield path, node


def field(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def mutated(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    parent: Any = config
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return config


NUMBERS = [(path, v) for path, v in leaves(BASE) if isinstance(v, int | float) and not isinstance(v, bool)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like gateway/examples (the retriever's knowledge folder next to the file)."""
    folder = tmp_path_factory.mktemp("example")
    shutil.copytree(EXAMPLE.parent / "knowledge", folder / "knowledge")
    return folder


def load(folder: Path, config: Any) -> Any:
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_the_numeric_fields_are_found() -> None:
    assert len(NUMBERS) >= 30 and (("limits", "timeouts", "connect_s"), 5) in NUMBERS


@pytest.mark.parametrize("value", [True, False, math.inf, -math.inf, math.nan], ids=repr)
def test_no_number_may_be_a_boolean_or_infinite(folder: Path, value: Any) -> None:
    """``port: yes`` was port 1, ``weight: true`` weight 1, ``max_queue: false`` no queue; an infinite connect
    timeout failed every health check (OverflowError), an infinite rate every request (500)."""
    for path, _ in NUMBERS:
        with pytest.raises(ConfigError) as err:
            load(folder, mutated(path, value))
        message = str(err.value)
        assert message.startswith(f"{folder / 'gateway.yaml'}: invalid configuration (1 problem(s)):"), message
        assert f"  {field(path)} (line " in message, message
        assert ("not a number" if isinstance(value, bool) else "finite number") in message


def test_large_finite_numbers_and_numeric_strings_are_numbers(folder: Path) -> None:
    config = load(folder, mutated(("limits", "timeouts", "read_s"), 1e300))
    assert config.limits.timeouts.read_s == 1e300
    assert load(folder, mutated(("listen", "port"), "8080")).listen.port == 8080


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(min_value=0, max_value=len(list(leaves(BASE))) - 1),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=8),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
)
def test_any_single_field_mutation_loads_or_names_the_field(folder: Path, index: int, value: Any) -> None:
    path = list(leaves(BASE))[index][0]
    try:
        load(folder, mutated(path, value))
    except ConfigError as err:
        message = str(err)
        assert message.startswith(str(folder / "gateway.yaml")) and "Traceback" not in message
        assert field(path[:1]) in message  # at least the section (a cross-field check may name a sibling)


@pytest.mark.parametrize("host", ["", " ", "bad host", "127.0.0.1:8000", "[::1]", "-x", "a..b"])
def test_listen_host_must_be_an_address(tmp_path: Path, host: str) -> None:
    """An empty host made uvicorn listen on every interface; garbage failed after start-up."""
    path = tmp_path / "gw.yaml"
    path.write_text(f"listen: {{host: {host!r}}}\n")
    with pytest.raises(ConfigError, match=r"listen\.host \(line 1\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"<command line>: .*\n  listen\.host: "):
        load_config(None, {"listen": {"host": host}})


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "gw-1.example.com.", "proj_gateway_1"]
)
def test_listen_host_takes_addresses_and_names(host: str) -> None:
    assert load_config(None, {"listen": {"host": host}}).listen.host == host


def test_the_sha256_of_the_empty_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(f"api_keys:\n  - {{sha256: {hash_key('')}, tenant: t}}\n")
    with pytest.raises(ConfigError, match=r"api_keys\[0\]\.sha256 \(line 2\): .*the sha256 of the empty key"):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"listen:\n  port: 1\nhealth: {timeout_s: 2}\nlisten: {port: 2}\n",
         "listen (line 4): given twice (also on line 1)"),
        (b"routes:\n  - name: a\n    cache: off\n    cache: shared\n",
         "routes[0].cache (line 4): given twice (also on line 3)"),
        (b"backends: []\nrouting: {policy: prefix}\n# \xe9t\xe9\n", "not UTF-8 text (line 3: byte 0xe9)"),
        (b"listen:\n\t port: 1\n", "invalid YAML (line 2, column 1): while scanning for the next token"),
        (b"listen: {}\n---\nlisten: {}\n", "invalid YAML (line 2, column 1): expected a single document"),
        (b"backends:\n  - {url: \"http://user:s3cret@127.0.0.1:1}\n", "invalid YAML (line 3, column 1)"),
        (b"!!python/object:os.system {}\n", "invalid YAML (line 1, column 1): could not determine a constructor"),
        (b"listen: " + b"[" * 2000 + b"]" * 2000 + b"\n", "invalid YAML: collections nested too deeply"),
    ],
)  # fmt: skip
def test_exotic_yaml_names_the_line_and_never_quotes_the_file(tmp_path: Path, raw: bytes, expected: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message, message
    assert "s3cret" not in message and "<unicode string>" not in message


def test_duplicate_keys_are_reported_with_every_other_problem(tmp_path: Path) -> None:
    """A key given twice and a mistake elsewhere are one run's report (the duplicate hid the rest until fixed)."""
    path = tmp_path / "gw.yaml"
    path.write_text("limits: {max_concurrency: 8}\nlimits: {max_concurrency: 9}\nlisten: {port: yes}\nroutng: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: invalid configuration (3 problem(s)):"
    assert lines[1].startswith("  limits (line 2): given twice (also on line 1)")
    assert any(line.startswith("  listen.port (line 3): ") for line in lines[2:])
    assert any(line.startswith("  routng (line 4): unknown field") for line in lines[2:])


def test_exotic_yaml_that_is_fine(tmp_path: Path) -> None:
    """A BOM, anchors and merge keys (a key a merge overrides is no duplicate), an empty file."""
    path = tmp_path / "gw.yaml"
    path.write_bytes(
        b"\xef\xbb\xbfbackends:\n  - &b {url: 'http://127.0.0.1:1', name: a}\n  - {<<: *b, name: b}\n"
        b"routes:\n  - &r {name: x, cache: off}\n  - {<<: *r, name: y}\n"
    )
    config = load_config(path)
    assert [b.display_name for b in config.backends] == ["a", "b"]
    assert [(r.name, r.cache) for r in config.routes] == [("x", "off"), ("y", "off")]
    path.write_bytes(b"")
    assert load_config(path).backends == ()
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(path)


def test_a_stage_catalog_that_is_not_utf8(tmp_path: Path) -> None:
    """It was a UnicodeDecodeError traceback from check-config and serve (and a 500 from a reload)."""
    (tmp_path / "stages.toml").write_bytes(b'[owners]\nroute = "caf\xe9"\n')
    path = tmp_path / "gw.yaml"
    path.write_text("stage_catalog: stages.toml\n")
    with pytest.raises(ConfigError, match=r"stage_catalog \(line 1\): .*stages\.toml: not UTF-8 text"):
        load_config(path)


def test_a_ledger_path_no_record_could_be_written_to(tmp_path: Path) -> None:
    """A folder was accepted and every record then failed to be written (lost); a file in the path was a
    FileExistsError traceback when serve started. Missing folders are fine: the sinks create them."""
    (tmp_path / "usage.jsonl").mkdir()
    (tmp_path / "taken").write_text("")
    path = tmp_path / "gw.yaml"
    cases = {
        "usage.jsonl": f"{tmp_path / 'usage.jsonl'} is a folder; name the ledger file",
        "taken/usage.db": f"{tmp_path / 'taken'} is a file, not a folder: the ledger cannot be created",
        "taken/more/usage.jsonl": f"{tmp_path / 'taken'} is a file, not a folder",
    }
    for ledger, reason in cases.items():
        path.write_text(f"usage:\n  ledger: {ledger}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert f"usage.ledger (line 2): {reason}" in str(err.value)
    path.write_text("usage:\n  ledger: new/folders/usage.jsonl\n")
    assert load_config(path).usage.ledger == tmp_path / "new" / "folders" / "usage.jsonl"


def test_a_stage_catalog_nested_too_deeply(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    path = tmp_path / "gw.yaml"
    path.write_text("stage_catalog: stages.toml\n")
    with pytest.raises(
        ConfigError, match=r"stage_catalog \(line 1\): .*stages\.toml: not valid TOML: nested too deeply"
    ):
        load_config(path)


def test_templates_nested_too_deeply(tmp_path: Path) -> None:
    """The JSON and Jinja parsers are recursive: each of these was a RecursionError traceback."""
    (tmp_path / "tokenizer_config.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    path = tmp_path / "gw.yaml"
    prompts = ["{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000, "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"]
    routes = ", ".join(f"{{name: r{i}, system_prompt: {json.dumps(p)}}}" for i, p in enumerate(prompts))
    path.write_text(f"tokenizer: {{chat_template: tokenizer_config.json}}\nroutes: [{routes}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "tokenizer.chat_template (line 1): nested too deeply to be parsed" in message
    assert "routes[0] (line 2): a template of the route: nested too deeply" in message
    assert "routes[1] (line 2): a template of the route: nested too deeply" in message
