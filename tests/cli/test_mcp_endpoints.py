"""MCP servers are added as endpoints of the ``mcp`` provider, by flag or in the configuration file; unknown hosts
are never intercepted unless configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from oisp.cli.main import _config_with_flags, _parser
from oisp.cli.run import endpoint_table
from oisp.config import load_config
from oisp.errors import ConfigurationError
from oisp.hookspecs import EndpointSpec
from oisp.plugins import create_plugin_manager


def _config(tmp_path: Path, *flags: str, toml: str = "") -> object:
    path = tmp_path / "oisp.toml"
    path.write_text(toml, encoding="utf-8")
    parser, _ = _parser()
    return _config_with_flags(parser.parse_args(["run", "--config", str(path), *flags]))


def test_add_endpoint_flags_for_mcp_servers(tmp_path: Path) -> None:
    config = _config(tmp_path, "--add-endpoint", "mcp=tools.corp.example", "--add-endpoint",
                     "mcp=tools.corp.example:8443", "--add-endpoint", "mcp=http://127.0.0.1:8000/")
    assert config.endpoints_add == (  # type: ignore[attr-defined]
        EndpointSpec("mcp", "tools.corp.example", 443, True), EndpointSpec("mcp", "tools.corp.example", 8443, True),
        EndpointSpec("mcp", "127.0.0.1", 8000, False))


def test_mcp_servers_in_the_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "oisp.toml"
    path.write_text('[endpoints]\nadd = [{ provider = "mcp", host = "mcp.corp.example" },\n'
                    '       { provider = "mcp", host = "localhost", port = 3000, tls = false }]\n', encoding="utf-8")
    config = load_config(path)
    table = endpoint_table(create_plugin_manager(entrypoints=False), config)
    assert table.match("mcp.corp.example", 443) == EndpointSpec("mcp", "mcp.corp.example")
    assert table.match("localhost", 3000) == EndpointSpec("mcp", "localhost", 3000, False)
    assert table.match("mcp.linear.app", 443) is not None  # the built-in list of well-known servers
    assert table.match("mcp.other.example", 443) is None  # never intercepted unless configured


@pytest.mark.parametrize("flag", ["mcp", "mcp=", "=host", "mcp=ftp://host", "mcp=host:port"])
def test_bad_add_endpoint_flags_are_refused_clearly(tmp_path: Path, flag: str) -> None:
    with pytest.raises(ConfigurationError, match="--add-endpoint"):
        _config(tmp_path, "--add-endpoint", flag)
