"""The kafka sink against librdkafka's mock cluster (real Kafka-protocol brokers on loopback, no JVM), consuming
the events back: delivery reports counted, a broker that goes away and comes back, a full queue that drops
(counted) instead of blocking, strict options."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from tests.sinks.helpers import make_event, make_events, wait_until

from oisp.errors import ConfigurationError
from oisp.events import AiRequest, Confidence, Event, Message
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.sinks.kafka import DEFAULT_CONFIG, KafkaSink, message_key, producer_config

confluent_kafka = pytest.importorskip("confluent_kafka", reason="the kafka extra: pip install 'oisp[kafka]'")
from tests.sinks.kafka_mock import MockCluster  # noqa: E402 (needs confluent_kafka)

TOPIC = "oisp-events"
QUIET = {"log_level": 0}  # the mock broker going down makes librdkafka log connection errors: expected here


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as c:
        c.create_topic(TOPIC, partitions=3)
        yield c


def consume(cluster: MockCluster, count: int, timeout: float = 20.0) -> list[Any]:
    """Read ``count`` messages of the topic from the start (fail after ``timeout``)."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": cluster.bootstrap_servers, "group.id": uuid.uuid4().hex,
                                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([TOPIC])
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(messages) < count:
            assert time.monotonic() < deadline, f"consumed {len(messages)} of {count} messages"
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                messages.append(message)
        extra = consumer.poll(0.3)  # nothing more than was produced
        assert extra is None or extra.error() is not None, "more messages than events"
        return messages
    finally:
        consumer.close()


def test_events_are_produced_keyed_and_consumed_back(cluster: MockCluster) -> None:
    sink = KafkaSink(cluster.bootstrap_servers)
    events = [make_event(i, pid=100 + i % 3) for i in range(90)]
    sink.write(events[:40])
    sink.write(events[40:])
    sink.close()
    stats = sink.stats()
    assert stats["queued"] == stats["delivered"] == 90
    assert stats["failed"] == stats["dropped"] == stats["undelivered"] == 0
    messages = consume(cluster, 90)
    by_id = {e.event_id: e for e in events}
    for message in messages:
        value = json.loads(message.value())
        assert value == json.loads(by_id[value["event_id"]].to_json())
        assert message.key() == f"build-7/{value['process']['pid']}".encode()
    # One agent process, one partition, in order.
    for pid in (100, 101, 102):
        keyed = [m for m in messages if m.key() == f"build-7/{pid}".encode()]
        assert len({m.partition() for m in keyed}) == 1
        assert [json.loads(m.value())["event_id"] for m in keyed] == \
            [e.event_id for e in events if e.process is not None and e.process.pid == pid]


def test_a_broker_that_goes_away_and_comes_back_gets_every_event(cluster: MockCluster) -> None:
    sink = KafkaSink(cluster.bootstrap_servers, config=QUIET)
    first, second = make_events(0, 50), make_events(50, 50)
    sink.write(first)
    wait_until(lambda: sink.stats()["delivered"] == 50, what="the first events delivered")
    cluster.broker_down()
    started = time.monotonic()
    sink.write(second)
    assert time.monotonic() - started < 0.5  # the capture never waits for Kafka
    wait_until(lambda: sink.stats()["in_queue"] == 50, what="the events waiting in the producer")
    time.sleep(0.5)  # not a synchronisation: an outage that lasts a while
    assert sink.stats()["delivered"] == 50
    cluster.broker_up()
    wait_until(lambda: sink.stats()["delivered"] == 100, timeout=30, what="the queued events delivered")
    sink.close()
    stats = sink.stats()
    assert stats["failed"] == stats["dropped"] == stats["undelivered"] == 0
    ids = [json.loads(m.value())["event_id"] for m in consume(cluster, 100)]
    assert sorted(ids) == sorted(e.event_id for e in first + second)  # each once: the producer is idempotent
    assert ids == [e.event_id for e in first + second]  # one key, one partition, in order


def test_a_full_queue_drops_and_counts_instead_of_blocking(cluster: MockCluster) -> None:
    cluster.broker_down()
    sink = KafkaSink(cluster.bootstrap_servers, config={**QUIET, "queue.buffering.max.messages": 10},
                     close_timeout=20)
    started = time.monotonic()
    for start in range(0, 100, 25):
        sink.write(make_events(start, 25))
    assert time.monotonic() - started < 0.5
    stats = sink.stats()
    assert stats["queued"] == 10 and stats["dropped"] == 90
    cluster.broker_up()
    sink.close()
    stats = sink.stats()
    assert stats["delivered"] == 10 and stats["undelivered"] == 0
    assert len(consume(cluster, 10)) == 10


def test_messages_that_cannot_be_delivered_in_time_are_counted_failed(cluster: MockCluster) -> None:
    cluster.broker_down()
    sink = KafkaSink(cluster.bootstrap_servers, config={**QUIET, "message.timeout.ms": 300}, close_timeout=0)
    sink.write(make_events(0, 5))
    wait_until(lambda: sink.stats()["failed"] == 5, what="delivery reports of failure")
    sink.close()
    assert sink.stats()["delivered"] == 0 and sink.last_error is not None


def test_an_event_larger_than_the_brokers_allow_is_counted_failed(cluster: MockCluster) -> None:
    sink = KafkaSink(cluster.bootstrap_servers, config={"message.max.bytes": 1000})
    big = Event.create(AiRequest(messages=[Message(role="user", content="x" * 2000)]),
                       confidence=Confidence(level="high", completeness="full"))
    sink.write([make_event(0), big])
    sink.close()
    stats = sink.stats()
    assert stats["failed"] == 1 and stats["delivered"] == stats["queued"] == 1
    assert "size" in (sink.last_error or "").lower()


def test_pipeline_reports_delivery_counts(cluster: MockCluster) -> None:
    sink = create_plugin_manager(entrypoints=False).create_sink(
        "kafka", {"bootstrap_servers": cluster.bootstrap_servers, "topic": TOPIC, "config": {"linger.ms": 5}})

    async def main() -> dict[str, Any]:
        async with Pipeline({"kafka": sink}) as pipeline:
            for i in range(200):
                pipeline.emit(make_event(i))
        return pipeline.summary()

    reported = anyio.run(main)["sinks"]["kafka"]["reported"]
    assert reported["delivered"] == 200 and reported["failed"] == reported["dropped"] == 0
    assert len(consume(cluster, 200)) == 200


# options and decisions ------------------------------------------------------------------------------
def test_message_keys() -> None:
    event = make_event(1, pid=77, hostname="ws-1")
    assert message_key(event, "process") == b"ws-1/77"
    assert message_key(event, "host") == b"ws-1"
    assert message_key(event, "event_id") == event.event_id.encode()
    assert message_key(event, "none") is None


def test_producer_config_defaults_and_overrides() -> None:
    config = producer_config("k1:9092,k2:9092", {"compression.type": "zstd", "security.protocol": "SASL_SSL"})
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    assert config["enable.idempotence"] is True and config["acks"] == "all"
    assert config["compression.type"] == "zstd" and config["security.protocol"] == "SASL_SSL"
    assert config["queue.buffering.max.messages"] == DEFAULT_CONFIG["queue.buffering.max.messages"]


@pytest.mark.parametrize(("options", "message"), [
    ({}, r"sinks\.kafka\.bootstrap_servers: required"),
    ({"bootstrap_servers": 9092}, r"sinks\.kafka\.bootstrap_servers: 9092"),
    ({"bootstrap_servers": "k:9092", "topics": "x"}, r"unknown option\(s\) \['topics'\]"),
    ({"bootstrap_servers": "k:9092", "topic": 5}, r"sinks\.kafka\.topic: 5"),
    ({"bootstrap_servers": "k:9092", "key": "pid"}, r"sinks\.kafka\.key: 'pid'"),
    ({"bootstrap_servers": "k:9092", "config": "acks=all"}, r"sinks\.kafka\.config: .* table"),
    ({"bootstrap_servers": "k:9092", "config": {"acks": ["all"]}}, r"sinks\.kafka\.config\.acks: \['all'\]"),
    ({"bootstrap_servers": "k:9092", "config": {"bootstrap.servers": "x"}},
     r"sinks\.kafka\.config\.bootstrap\.servers: set by oisp \(use bootstrap_servers\)"),
    ({"bootstrap_servers": "k:9092", "config": {"no.such.property": 1}}, r"sinks\.kafka\.config: .*no\.such\.property"),
    ({"bootstrap_servers": "k:9092", "config": {"acks": "sometimes"}}, r"sinks\.kafka\.config: .*acks"),
    ({"bootstrap_servers": "k:9092", "close_timeout": -1}, r"sinks\.kafka\.close_timeout"),
])
def test_configuration_is_validated_strictly(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        create_plugin_manager(entrypoints=False).create_sink("kafka", options)


def test_a_list_of_bootstrap_servers_is_accepted() -> None:
    sink = KafkaSink.from_options({"bootstrap_servers": ["127.0.0.1:1", "127.0.0.1:2"], "config": QUIET,
                                   "close_timeout": 0})
    sink.close()


def test_without_confluent_kafka_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'oisp\[kafka\]'"):
        KafkaSink("k:9092")
