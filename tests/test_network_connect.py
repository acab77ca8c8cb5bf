"""The ``network.connect`` event of a proxied connection says how its process was found, and stays valid OISP."""

from __future__ import annotations

import pytest
from tests.oisp_schema import SchemaValidator

from oisp.attribution import PidSource
from oisp.event_decoder import network_connect_event
from oisp.events import Actor, ProcessInfo
from oisp.proxy.report import ConnectionReport, Decision


def _report(**fields: object) -> ConnectionReport:
    return ConnectionReport(connection_id="c1", mode="transparent", client_addr=("198.18.1.1", 40000),
                            target_host="api.openai.com", target_port=443, decision=Decision.INTERCEPTED,
                            success=True, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("source", "confidence"), [
    (PidSource.FLOW_LAYER, "direct"),
    (PidSource.SOCK_DIAG_ORIGINAL, "socket_inode"),
    (PidSource.PROC_NET_ORIGINAL, "socket_inode"),
    (PidSource.SOCK_DIAG, "socket_inode"),
    (PidSource.PROC_NET, "socket_inode"),
    (PidSource.SOCKET_TABLE, "socket_inode"),
])
def test_the_pid_source_is_an_attribute_and_sets_the_confidence(source: PidSource, confidence: str,
                                                                 oisp_schema: SchemaValidator) -> None:
    event = network_connect_event(_report(process=ProcessInfo(pid=4242, exe="/usr/bin/curl"),
                                          actor=Actor(uid=65534, user="nobody"), pid_source=str(source)))
    assert event.attrs is not None and event.attrs["oisp.pid_source"] == source.value
    assert event.confidence.process_attribution == confidence
    oisp_schema.assert_valid(event.to_dict())


def test_without_a_process_there_is_no_pid_source(oisp_schema: SchemaValidator) -> None:
    event = network_connect_event(_report())
    assert event.attrs is not None and "oisp.pid_source" not in event.attrs
    assert event.confidence.process_attribution == "unknown"
    oisp_schema.assert_valid(event.to_dict())
