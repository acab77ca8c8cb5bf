"""What ``import oisp`` gives a script author or a plugin author."""

from __future__ import annotations

import subprocess
import sys

import pluggy
import pytest

import oisp


@pytest.mark.parametrize("name", [n for n in oisp.__all__ if n not in ("__version__", "hookimpl", "SinkFactory")])
def test_every_public_name_resolves_and_says_what_it_is_for(name: str) -> None:
    value = getattr(oisp, name)
    assert value.__module__.startswith("oisp."), name
    assert (value.__doc__ or "").strip(), f"oisp.{name} has no docstring"


def test_the_composable_parts_are_at_the_top() -> None:
    from oisp.proxy import MitmProxy
    from oisp.tls import CertificateAuthority

    assert oisp.MitmProxy is MitmProxy and oisp.CertificateAuthority is CertificateAuthority
    assert {"MitmProxy", "Interceptor", "Attributor", "EventDecoder", "Pipeline"} <= set(dir(oisp))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        oisp.Nope  # noqa: B018


def test_hookimpl_is_the_marker_the_plugin_docs_use() -> None:
    @oisp.hookimpl
    def oisp_sink_types() -> dict[str, object]:
        return {}

    assert isinstance(oisp.hookimpl, pluggy.HookimplMarker)
    assert hasattr(oisp_sink_types, "oisp_impl")


def test_import_oisp_stays_cheap() -> None:
    code = "import sys, oisp; print(sorted(m for m in ('oisp.proxy', 'oisp.interception', 'cryptography') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
