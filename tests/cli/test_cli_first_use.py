"""What a first-time user of the ``oisp`` command tripped over: mistakes are refused up front, clearly, before
anything is written, and flags go where users put them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oisp.cli.main import _sink_flag, main
from oisp.errors import ConfigurationError


def _oisp(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oisp.cli.main", *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, check=False)


def test_a_reverse_target_without_a_scheme_is_refused_at_start(tmp_path: Path) -> None:
    out = _oisp("run", "--mode", "reverse", "--reverse-target", "api.openai.com", "--listen", "127.0.0.1:0",
                "--confdir", str(tmp_path / "conf"), "--stdout", "none", tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "reverse_target: 'api.openai.com' must be an http:// or https:// URL" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unknown_sink_kind_is_refused_before_a_ca_is_written(tmp_path: Path) -> None:
    config = tmp_path / "oisp.toml"
    config.write_text('[[sinks]]\nkind = "nosuch"\n')
    out = _oisp("run", "--config", str(config), "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"),
                "--stdout", "none", tmp_path=tmp_path)
    assert out.returncode == 2 and "unknown sink kind 'nosuch'" in out.stderr
    assert not (tmp_path / "conf").exists()
    out = _oisp("run", "--sink", "nosuch:a=1", "--confdir", str(tmp_path / "conf"), tmp_path=tmp_path)
    assert out.returncode == 2 and "unknown sink kind 'nosuch'" in out.stderr
    assert not (tmp_path / "conf").exists()


def test_verbose_goes_before_or_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "plugins", "-v", "--json"]) == 0
    assert '"plugins"' in capsys.readouterr().out


def test_a_bad_flag_shows_the_subcommands_usage(tmp_path: Path) -> None:
    out = _oisp("run", "--listen-port", "0", tmp_path=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: oisp run ") and "unrecognized arguments: --listen-port 0" in out.stderr


def test_sink_flag_mirrors_a_sinks_table() -> None:
    assert _sink_flag("jsonl:path=events.jsonl,rotate_bytes=1000,compress=true") == {
        "kind": "jsonl", "path": "events.jsonl", "rotate_bytes": 1000, "compress": True}
    assert _sink_flag('stdout:format="json"') == {"kind": "stdout", "format": "json"}
    assert _sink_flag("memory") == {"kind": "memory"}
    with pytest.raises(ConfigurationError, match="--sink jsonl: 'path' is not KEY=VALUE"):
        _sink_flag("jsonl:path")
    with pytest.raises(ConfigurationError, match="KIND"):
        _sink_flag(":path=x")


def test_sink_flags_join_the_configured_sinks(tmp_path: Path) -> None:
    from oisp.cli.main import _config_with_flags, _parser

    config = tmp_path / "oisp.toml"
    config.write_text(f'[[sinks]]\nkind = "jsonl"\npath = "{tmp_path / "a.jsonl"}"\n')
    args = _parser()[0].parse_args(["run", "--config", str(config), "--sink", f"jsonl:path={tmp_path / 'b.jsonl'}",
                                    "--sink", "memory:max_events=5", "--stdout", "none"])
    assert _config_with_flags(args).sinks == (
        {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}, {"kind": "jsonl", "path": str(tmp_path / "b.jsonl")},
        {"kind": "memory", "max_events": 5})
