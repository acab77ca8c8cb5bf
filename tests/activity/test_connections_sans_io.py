"""The decisions of the connection sources, fed facts (sans-io): which connections become events, and the event."""

from __future__ import annotations

import os

from tests.oisp_schema import SchemaValidator

from oisp.activity import AgentScope
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.connections import NOT_INTERCEPTED, ConnectFacts, ConnectionFilter, connect_event


def test_only_connections_of_agents_that_the_proxy_does_not_intercept_are_reported() -> None:
    scope = AgentScope()
    scope.add_agent(100)
    scope.on_fork(100, 101)
    looked_up = []

    def listeners() -> set[int]:
        looked_up.append(1)
        return {8080}

    proxied = ConnectionFilter(scope, listeners=listeners,
                               proxied=[lambda local, remote: remote == ("203.0.113.7", 443)])
    # a tool's child connecting to a plain server: reported, for the agent
    assert proxied.admit(ConnectFacts(101, ("10.0.0.2", 40000), ("10.0.0.9", 5432), 1)) == 100
    # to the proxy's listener (this process listens there: explicit mode), over loopback or the own address
    assert proxied.admit(ConnectFacts(100, ("127.0.0.1", 40001), ("127.0.0.1", 8080), 2)) is None
    assert proxied.admit(ConnectFacts(100, ("10.0.0.2", 40002), ("10.0.0.2", 8080), 3)) is None
    # the same port on another machine is not the proxy
    assert proxied.admit(ConnectFacts(100, ("10.0.0.2", 40003), ("10.0.0.9", 8080), 4)) == 100
    # a connection the interceptor diverts (transparent mode): the proxy reports it
    assert proxied.admit(ConnectFacts(100, ("10.0.0.2", 40004), ("203.0.113.7", 443), 5)) is None
    assert proxied.intercepted == 3
    # processes out of scope, and this process itself, are never reported
    assert proxied.admit(ConnectFacts(200, ("10.0.0.2", 40005), ("10.0.0.9", 80), 6)) is None
    assert proxied.admit(ConnectFacts(os.getpid(), ("10.0.0.2", 40006), ("10.0.0.9", 80), 7)) is None
    assert proxied.out_of_scope == 1
    assert len(looked_up) == 1  # the listeners are looked up once, not per connection


def test_a_new_agents_earlier_connections_are_replayed_once() -> None:
    scope = AgentScope()
    flt = ConnectionFilter(scope, listeners=lambda: {8080})
    before = ConnectFacts(300, ("127.0.0.1", 40000), ("127.0.0.1", 9000), 1_000)
    to_proxy = ConnectFacts(300, ("127.0.0.1", 40001), ("127.0.0.1", 8080), 2_000)
    other = ConnectFacts(301, ("127.0.0.1", 40002), ("127.0.0.1", 9000), 3_000)
    old = ConnectFacts(300, ("127.0.0.1", 40003), ("127.0.0.1", 9000), 10)
    for facts in (old, before, to_proxy, other):
        assert flt.admit(facts) is None
    scope.add_agent(300)
    assert flt.replay(300, since_ns=500) == [before]  # not the one to the proxy, nor one before since_ns
    assert flt.replay(300, since_ns=500) == []


def test_the_event_says_not_intercepted_and_validates(oisp_schema: SchemaValidator) -> None:
    facts = ProcessFacts(100, ppid=1, exe="/usr/bin/python3", args=["python3", "agent.py"], uid=0, agent=100)
    event = connect_event(ConnectFacts(100, ("::ffff:10.0.0.2", 40000), ("10.0.0.9", 5432), 5_000_000), facts,
                          Clock(), point="flow_established")
    oisp_schema.assert_valid(event.to_dict())
    assert event.event_type == "network.connect"
    assert (event.attrs or {})["oisp.interception"] == NOT_INTERCEPTED
    assert (event.attrs or {})["oisp.agent_pid"] == 100
    data = event.data
    assert (data.dest.ip, data.dest.port, data.src.ip, data.protocol) == (  # type: ignore[attr-defined]
        "10.0.0.9", 5432, "10.0.0.2", "tcp")
    assert event.confidence.ai_detection_method is None and event.ts_mono == 5_000_000
    polled = connect_event(ConnectFacts(100, ("10.0.0.2", 40000), ("10.0.0.9", 5432), 5_000_000), facts, Clock(),
                           point="socket_table_poll", sampled=True, limitations=["connections_polled"],
                           pid_source="socket_inode")
    oisp_schema.assert_valid(polled.to_dict())
    assert polled.confidence.completeness == "sampled"
    assert polled.confidence.process_attribution == "socket_inode"


def test_connections_and_watch_directories_are_read_from_the_activity_table() -> None:
    import pytest

    from oisp.activity.runner import settings_from
    from oisp.config import parse_config
    from oisp.errors import ConfigurationError

    settings = settings_from(parse_config({"activity": {"connections": False, "watch_directories": True}}))
    assert (settings.connections, settings.watch_directories) == (False, True)
    default = settings_from(parse_config({}))
    assert (default.connections, default.watch_directories) == (True, None)
    with pytest.raises(ConfigurationError, match="activity.connections"):
        parse_config({"activity": {"connections": "yes"}})
