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


def test_equal_context_records_of_many_connections_become_one_object_and_the_text_does_not_change() -> None:
    from oisp.decoder_process.wire import dump_object, load_object
    from oisp.event_decoder import EventDecoder
    from oisp.events import App, ParentProcess
    from oisp.http.exchange import ConnectionInfo
    from oisp.pipeline import Pipeline
    from oisp.plugins import create_plugin_manager

    process = ProcessInfo(pid=4242, exe="/usr/bin/python3", cmdline_args=["python3", "app.py"],
                          start_time="2026-01-01T00:00:00.000000Z",
                          ancestors=[ParentProcess(pid=1, exe="/sbin/init", name="init")])
    actor, app = Actor(uid=1000, user="dev"), App(app_id="python", name="Python")
    emitted: list = []
    decoder = EventDecoder(create_plugin_manager(entrypoints=False), emitted.append)
    # as the decoder process gets them: every connection's records pickled, with the connection and its report
    for number in range(3):
        info = ConnectionInfo(connection_id=f"c{number}", client_addr=("127.0.0.1", number),
                              server_addr=("api.openai.com", 443), process=process, actor=actor, app=app)
        listener = decoder.exchange_listener(load_object(dump_object(info)))
        decoder.connection(load_object(dump_object(_report(process=process, actor=actor, app=app))))
        assert listener.connection.process is emitted[0].process  # the first one seen stands for all
        assert listener.connection.process is not process
        assert listener.connection.actor is emitted[0].actor and listener.connection.app is emitted[0].app
    assert all(event.process is emitted[0].process for event in emitted)
    pipeline = Pipeline({})
    plain = EventDecoder(create_plugin_manager(entrypoints=False), lambda event: None)
    for event in emitted:  # the same text as without interning (fresh objects each)
        assert pipeline.process(event).to_json() == pipeline.process(
            event.with_context(process=load_object(dump_object(process)))).to_json()
    changed = attrs_evolve(process, cmdline_args=["python3", "other.py"])  # equal pid and start, other value
    plain.connection(_report(process=changed))
    decoder.connection(_report(process=changed))
    assert emitted[-1].process == changed and emitted[-1].process is not emitted[0].process


def attrs_evolve(value: object, **changes: object) -> ProcessInfo:
    import attrs

    return attrs.evolve(value, **changes)  # type: ignore[misc, return-value]
