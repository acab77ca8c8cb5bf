"""The plugin system: built-ins through the same hooks, entry-point discovery, isolation of failing plugins."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.events.samples import ALL

from oisp.errors import ConfigurationError, PluginError
from oisp.hookspecs import SinkFactory, hookimpl
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.sinks.memory import MemorySink


def _example_sink_installed() -> bool:
    if any(ep.name == "example" for ep in entry_points(group="oisp.sinks")):
        return True
    message = "the example plugin package is not installed: pip install ./tests/plugins/oisp-example-sink"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def test_builtin_sinks_are_registered_through_the_public_hook() -> None:
    manager = create_plugin_manager(entrypoints=False)
    kinds = manager.sink_types()
    assert {"memory", "jsonl", "stdout"} <= set(kinds)
    assert all(plugin == "oisp.sinks.builtin" for plugin, _ in kinds.values())
    impls = manager.pm.hook.oisp_sink_types.get_hookimpls()
    assert [i.plugin_name for i in impls] == ["oisp.sinks.builtin"]


def test_third_party_sink_package_is_discovered_and_receives_real_events(tmp_path: Path) -> None:
    _example_sink_installed()
    manager = create_plugin_manager()
    info = {p.name: p for p in manager.plugins()}["oisp.sinks:example"]
    assert info.package == "oisp-example-sink" and info.version == "0.1.0" and not info.builtin
    out = tmp_path / "counts.json"
    sink = manager.create_sink("type-counter", {"path": str(out)})
    events = [factory() for factory in ALL.values()]

    async def main() -> None:
        async with Pipeline({"counter": sink}) as pipeline:
            pipeline.emit_many(events)

    anyio.run(main)
    written = json.loads(out.read_text())
    assert written["counts"] == {e.event_type: 1 for e in events}
    assert written["event_ids"] == [e.event_id for e in events]


def test_third_party_sink_configuration_errors_pass_through_naming_the_key() -> None:
    _example_sink_installed()
    with pytest.raises(ConfigurationError, match=r"sinks\.type-counter\.path: required"):
        create_plugin_manager().create_sink("type-counter", {})


def test_unknown_sink_kind_lists_the_available_ones() -> None:
    with pytest.raises(PluginError, match=r"unknown sink kind 'nope'; available: .*jsonl"):
        create_plugin_manager(entrypoints=False).create_sink("nope")


class ExplodingPlugin:
    @hookimpl
    def oisp_sink_types(self) -> Mapping[str, SinkFactory]:
        raise RuntimeError("plugin bug")

    @hookimpl
    def oisp_endpoints(self) -> list[Any]:
        raise RuntimeError("plugin bug")


class WorkingPlugin:
    def __init__(self) -> None:
        self.sink = MemorySink()

    @hookimpl
    def oisp_sink_types(self) -> Mapping[str, SinkFactory]:
        return {"working": lambda options: self.sink}


def test_a_plugin_failing_in_a_hook_is_logged_by_name_and_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    manager = create_plugin_manager(entrypoints=False)
    manager.register(ExplodingPlugin(), "exploding")
    working = WorkingPlugin()
    manager.register(working, "working-plugin")
    with caplog.at_level(logging.ERROR, logger="oisp.plugins"):
        kinds = manager.sink_types()
        endpoints = manager.endpoints()
    assert "working" in kinds and "memory" in kinds
    assert isinstance(endpoints, list)
    assert any("exploding" in r.getMessage() and "plugin bug" in r.getMessage() for r in caplog.records)
    sink = manager.create_sink("working")
    sink.write([ALL["ai.request"]()])
    assert len(working.sink.events) == 1


def test_a_plugin_that_fails_to_import_is_recorded_and_skipped(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[oisp.sinks]\nbroken = broken_plugin_module_that_does_not_exist\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with caplog.at_level(logging.ERROR, logger="oisp.plugins"):
            manager = create_plugin_manager()
    finally:
        sys.path.remove(str(tmp_path))
    assert "oisp.sinks:broken" in manager.failures
    assert "ModuleNotFoundError" in manager.failures["oisp.sinks:broken"]
    assert any("oisp.sinks:broken" in r.getMessage() for r in caplog.records)
    assert "memory" in manager.sink_types()


class RaisingFactoryPlugin:
    @hookimpl
    def oisp_sink_types(self) -> Mapping[str, SinkFactory]:
        def factory(options: Mapping[str, Any]) -> Any:
            raise ValueError("cannot connect")

        return {"raising": factory, "not-a-sink": lambda options: object()}


def test_sink_factories_that_fail_or_return_non_sinks_raise_plugin_error() -> None:
    manager = create_plugin_manager(entrypoints=False)
    manager.register(RaisingFactoryPlugin(), "raising-plugin")
    with pytest.raises(PluginError, match="raising-plugin.*cannot connect"):
        manager.create_sink("raising")
    with pytest.raises(PluginError, match="no write/close"):
        manager.create_sink("not-a-sink")


def test_registering_the_same_name_twice_is_an_error() -> None:
    manager = create_plugin_manager(entrypoints=False)
    with pytest.raises(PluginError, match="already registered"):
        manager.register(WorkingPlugin(), "oisp.sinks.builtin")




def _example_provider_installed() -> None:
    if any(ep.name == "acme" for ep in entry_points(group="oisp.providers")):
        return
    message = "the example provider package is not installed: pip install ./tests/plugins/oisp-example-provider"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def test_third_party_provider_claims_its_endpoint_and_decodes_real_traffic(tmp_path: Path) -> None:
    _example_provider_installed()
    import httpx
    import trustme
    from tests.stack import running_stack
    from tests.upstream import Request, Response

    async def acme(request: Request) -> Response:
        async def body() -> Any:
            yield b'{"delta": "Hello"}\n'
            yield b'{"delta": ", world"}\n{"done": true, "stop": "end", "tokens": {"in": 3, "out": 2}}\n'
        return Response(headers=[("content-type", "application/x-ndjson")], body=body)

    with running_stack(tmp_path, trustme.CA(), handler=acme) as stack:
        info = {p.name: p for p in create_plugin_manager().plugins()}["oisp.providers:acme"]
        assert info.package == "oisp-example-provider"
        with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
            r = client.post("https://api.acme-llm.example/v2/generate",
                            json={"model": "acme-1", "prompt": "Say hello", "stream": True})
        assert r.status_code == 200
        events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    request = next(e for e in events if e.event_type == "ai.request")
    response = next(e for e in events if e.event_type == "ai.response")
    assert request.attrs and request.attrs["oisp.original"]["data.provider.name"] == "acme"
    assert request.data.messages[0].content == "Say hello"  # type: ignore[attr-defined]
    assert response.data.choices[0].message.content == "Hello, world"  # type: ignore[attr-defined]
    assert response.data.usage.prompt_tokens == 3 and response.data.usage.completion_tokens == 2  # type: ignore[attr-defined]


def test_a_proxy_without_an_endpoint_table_knows_the_plugins_hosts(tmp_path: Path) -> None:
    from oisp.proxy import MitmProxy, ProxyConfig
    from oisp.tls import CertificateAuthority

    proxy = MitmProxy(ProxyConfig(listen_port=0), ca=CertificateAuthority.load_or_create(tmp_path))
    assert proxy.endpoints.match("api.acme-llm.example", 443) is not None  # the example provider plugin's host
    assert proxy.endpoints.match("api.openai.com", 443) is not None
