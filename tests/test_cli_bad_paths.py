"""Paths the command line is given that cannot be used: an output folder that is a file (or under one), a work
folder that cannot be created, option files that are not UTF-8. Each is exit code 2 with the option, the path and
the reason, never a traceback, and nothing is written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def llmpath(llmpath_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([llmpath_bin, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["dashboards", "runbooks"])
def test_an_output_folder_that_is_a_file(llmpath_bin: str, tmp_path: Path, command: str) -> None:
    """Both were tracebacks (FileExistsError, NotADirectoryError)."""
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    cases: list[tuple[list[str | Path], str]] = [
        (["build", "--out", taken], f"--out {taken}: exists and is not a folder"),
        (["build", "--out", taken, "--check"], f"--out {taken}: exists and is not a folder"),
        (["build", "--out", taken / "sub"], f"--out {taken / 'sub'}: cannot write: Not a directory"),
    ]
    for args, message in cases:
        out = llmpath(llmpath_bin, command, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.strip() == message and "Traceback" not in out.stderr
    assert taken.read_text() == "keep me\n"


def test_a_demo_work_folder_that_cannot_be_created(llmpath_bin: str, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    for workdir, reason in ((taken, "File exists"), (taken / "sub", "Not a directory")):
        out = llmpath(llmpath_bin, "demo", "--once", "--preset", "tiny", "--workdir", workdir)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"error: --workdir {workdir}: cannot create the folder: {reason}"
    assert taken.read_text() == "keep me\n"


def test_a_demo_preset_that_does_not_exist_is_refused_before_anything_starts(llmpath_bin: str, tmp_path: Path) -> None:
    """It was said by the engines once they tried to start (about 5 s), with the work folder already made."""
    workdir = tmp_path / "build"
    out = llmpath(llmpath_bin, "demo", "--once", "--preset", "huge", "--workdir", workdir)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: --preset: unknown preset 'huge'; known presets: tiny, small, llama-8b"
    assert not workdir.exists()


def test_option_files_that_are_not_utf8(llmpath_bin: str, tmp_path: Path) -> None:
    """A Latin-1 catalog or price file was a UnicodeDecodeError traceback."""
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[owners]\nroute = "caf\xe9"\n')
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text("")
    cases: list[tuple[list[str | Path], str]] = [
        (["usage", "summary", ledger, "--catalog", latin], f"llmpath: --catalog {latin}: not UTF-8 text"),
        (["usage", "summary", ledger, "--prices", latin], f"llmpath usage: --prices {latin}: not UTF-8 text"),
        (
            ["dashboards", "build", "--out", tmp_path / "d", "--catalog", latin],
            f"llmpath: --catalog {latin}: not UTF-8",
        ),
    ]
    for args, message in cases:
        out = llmpath(llmpath_bin, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith(message) and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "d").exists()


def test_slo_outputs_under_a_file(llmpath_bin: str, tmp_path: Path) -> None:
    """`slo compile --out` and `slo init` under a file were FileExistsError tracebacks."""
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    spec = tmp_path / "slos.yaml"
    assert llmpath(llmpath_bin, "slo", "init", spec).returncode == 0
    cases: list[tuple[list[str | Path], Path]] = [
        (["slo", "compile", spec, "--out", taken / "rules"], taken / "rules"),
        (["slo", "compile", spec, "--out", taken / "rules.yaml"], taken / "rules.yaml"),
        (["slo", "init", taken / "slos.yaml"], taken / "slos.yaml"),
    ]
    for args, out in cases:
        result = llmpath(llmpath_bin, *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines() == [
            f"{out}: cannot write ({taken}): File exists",
            f"1 error; nothing was written to {out}.",
        ]
    assert taken.read_text() == "keep me\n"


def test_option_files_nested_too_deeply(llmpath_bin: str, tmp_path: Path) -> None:
    """tomllib parses nested arrays recursively: a few thousand were a RecursionError traceback."""
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text("")
    cases: list[tuple[list[str | Path], str]] = [
        (["usage", "summary", ledger, "--catalog", deep], f"llmpath: --catalog {deep}: not valid TOML: "),
        (["usage", "summary", ledger, "--prices", deep], f"llmpath usage: --prices {deep}: not valid TOML: "),
    ]
    for args, message in cases:
        out = llmpath(llmpath_bin, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith(message) and "nested too deeply" in out.stderr, out.stderr
