"""A pytest plugin: see which AI calls the code under test makes, and assert on them.

Installed with oisp (entry point ``pytest11``), it offers the ``oisp_capture`` fixture: an oisp proxy in the
test's own process, on loopback, with the test's environment pointed at it (``HTTPS_PROXY``, ``HTTP_PROXY`` and
the CA variables the usual SDKs read), collecting the AI events of whatever the test runs::

    def test_agent_uses_the_small_model(oisp_capture):
        run_my_agent("What is the weather in Paris?")
        call = oisp_capture.wait_for_calls(1)[0]
        assert call.model == "gpt-4o-mini"
        assert call.tool_names == ["get_weather"]

Override the ``oisp_capture_options`` fixture to configure it: ``resolve`` (``HOST:PORT:ADDR[:PORT]`` entries,
to send a host to a local stand-in), ``upstream_ca`` (a CA file the stand-in's certificate is issued by),
``set_env`` (False to leave the environment alone; use :meth:`AICapture.env`).

Outside pytest, :func:`oisp.capture_ai` is the same thing as a context manager.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from oisp.capture import AICapture, capture_ai

__all__ = ["AICapture", "capture_ai", "oisp_capture", "oisp_capture_options"]


@pytest.fixture
def oisp_capture_options() -> Mapping[str, Any]:
    """Options of :func:`capture_ai` for the ``oisp_capture`` fixture (override it), plus ``set_env``."""
    return {}


@pytest.fixture
def oisp_capture(oisp_capture_options: Mapping[str, Any], tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[AICapture]:
    """An in-process oisp proxy for the test, with the test's environment pointed at it (see the module)."""
    options = dict(oisp_capture_options)
    set_env = bool(options.pop("set_env", True))
    options.setdefault("confdir", tmp_path_factory.mktemp("oisp-capture"))
    with capture_ai(**options) as capture:
        if set_env:
            for name, value in capture.env().items():
                monkeypatch.setenv(name, value)
            for name in ("ALL_PROXY", "all_proxy"):
                monkeypatch.delenv(name, raising=False)
        yield capture
