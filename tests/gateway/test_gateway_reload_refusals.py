"""A reload that cannot load its file is refused, logged (without an excerpt of the file) and counted, and the
running configuration is untouched: whatever the file holds (checked without a gateway: loading comes first)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llmpath.gateway.config import GatewayConfig, load_config
from llmpath.gateway.reload import ConfigReloader, ReloadError


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"listen: {port: 1}\nrouting: {policy: prefix}\n# caf\xe9\n", "not UTF-8 text (line 3: byte 0xe9)"),
        (b"backends:\n  - {url: \"http://user:s3cret@127.0.0.1:1}\n", "invalid YAML (line 3, column 1)"),
        (b"limits: {max_concurrency: 8}\nlimits: {max_concurrency: 9}\n", "limits (line 2): given twice"),
        (b"limits: {timeouts: {queue_s: .inf}}\n", "limits.timeouts.queue_s (line 1): Input should be a finite"),
    ],
)  # fmt: skip
def test_a_file_that_does_not_load_is_refused_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, raw: bytes, reason: str
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(raw)
    results: list[bool] = []
    gateway: Any = object()  # never reached: the file is loaded first
    reloader = ConfigReloader(gateway, lambda: load_config(path), results.append)
    with caplog.at_level(logging.ERROR, logger="llmpath.gateway"), pytest.raises(ReloadError) as err:
        reloader.reload("SIGHUP")
    assert reason in str(err.value) and results == [False]
    logged = caplog.text
    assert "configuration reload (SIGHUP) failed, nothing changed" in logged and reason in logged
    assert "s3cret" not in logged and "Traceback" not in logged


def test_an_unforeseen_load_failure_is_still_a_counted_refusal(caplog: pytest.LogCaptureFixture) -> None:
    quoted = "url: http://user:s3cret@10.0.0.1"  # what the file held

    def load() -> GatewayConfig:
        raise RuntimeError(quoted)  # a message that quotes the file

    results: list[bool] = []
    gateway: Any = object()
    with caplog.at_level(logging.ERROR, logger="llmpath.gateway"), pytest.raises(ReloadError, match="RuntimeError"):
        ConfigReloader(gateway, load, results.append).reload("POST /admin/reload")
    assert results == [False] and "failed, nothing changed" in caplog.text
    assert "in load" in caplog.text  # where it was raised, for whoever fixes it
    assert "s3cret" not in caplog.text


def test_a_failure_applying_a_loaded_configuration_is_not_a_refusal() -> None:
    """A bug applying a configuration that loaded (some sections may be swapped already) is no "nothing changed"
    refusal: it propagates (a 500 from the admin endpoint, a traceback in the log)."""

    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise AttributeError(f"broken gateway: {name}")

    results: list[bool] = []
    config = load_config(None, {"insecure_no_auth": True})
    with pytest.raises(AttributeError, match="broken gateway"):
        ConfigReloader(Broken(), lambda: config, results.append).reload("SIGHUP")  # type: ignore[arg-type]
    assert results == []
