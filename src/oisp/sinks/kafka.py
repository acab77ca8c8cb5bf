"""``kafka`` sink: each event as one JSON message to a Kafka topic, through librdkafka (``pip install 'oisp[kafka]'``).

Messages are ``Event.to_json()`` (UTF-8); the key keeps related events in one partition, so in order: by default
``<hostname>/<pid>`` of the agent process that made the call (``key = "process"``), or ``"host"``, ``"event_id"``
or ``"none"``. The producer is idempotent with ``acks=all`` and lz4 compression unless ``config`` (handed to
librdkafka as it is: security settings, tuning) says otherwise.

Nothing blocks the capture: :meth:`KafkaSink.write` only hands messages to librdkafka's bounded queue
(``queue.buffering.max.messages``, ``queue.buffering.max.kbytes``). While the brokers are down the queue fills;
once it is full, further events are dropped and counted (``dropped``), never waited for. Messages still queued
when the brokers come back are delivered then (librdkafka retries them until ``message.timeout.ms``). Delivery
reports are counted by a background thread: ``delivered``, and ``failed`` (timed out or refused by the brokers).
``close()`` flushes for at most ``close_timeout`` seconds and counts what is left as ``undelivered``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from oisp.errors import ConfigurationError, OispError
from oisp.events import Event
from oisp.sinks._options import Options

__all__ = ["DEFAULT_CONFIG", "KEY_MODES", "KafkaSink", "message_key", "producer_config"]

logger = logging.getLogger(__name__)

_OPTIONS = ("bootstrap_servers", "topic", "key", "config", "close_timeout")
KEY_MODES = ("process", "host", "event_id", "none")

#: librdkafka settings oisp uses unless ``config`` sets them.
DEFAULT_CONFIG: Mapping[str, str | int | float | bool] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 20,
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 262_144,
    "message.timeout.ms": 300_000,
}
#: Keys of ``config`` that oisp sets itself.
_RESERVED = frozenset({"bootstrap.servers", "metadata.broker.list", "on_delivery", "dr_cb", "dr_msg_cb", "error_cb",
                       "logger", "stats_cb", "throttle_cb", "oauth_cb"})
_POLL_INTERVAL = 0.05
_LOG_EVERY = 10.0


def producer_config(bootstrap_servers: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The librdkafka configuration of the producer: :data:`DEFAULT_CONFIG`, ``config`` over it, the servers."""
    for key in config:
        if key in _RESERVED:
            raise ConfigurationError(
                f"sinks.kafka.config.{key}: set by oisp"
                + (" (use bootstrap_servers)" if key in ("bootstrap.servers", "metadata.broker.list") else "")
            )
    merged: dict[str, Any] = {**DEFAULT_CONFIG, **config}
    merged.setdefault("client.id", f"oisp-{socket.gethostname()}")
    merged["bootstrap.servers"] = bootstrap_servers
    return merged


def message_key(event: Event, mode: str) -> bytes | None:
    """The message key of ``event`` under ``mode`` (one of :data:`KEY_MODES`)."""
    if mode == "none":
        return None
    if mode == "event_id":
        return event.event_id.encode()
    host = (event.host.hostname if event.host is not None else None) or ""
    if mode == "host":
        return host.encode("utf-8", "surrogatepass")
    pid = event.process.pid if event.process is not None else None
    return f"{host}/{pid if pid is not None else ''}".encode("utf-8", "surrogatepass")


def _import_confluent_kafka() -> ModuleType:
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigurationError(
            f"sinks.kafka: the kafka sink needs confluent-kafka: pip install 'oisp[kafka]' ({exc})"
        ) from exc
    return confluent_kafka


class KafkaSink:
    """Produces every event to ``topic`` on the Kafka cluster at ``bootstrap_servers`` (see the module)."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str = "oisp-events",
        key: str = "process",
        config: Mapping[str, Any] | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        if key not in KEY_MODES:
            raise ConfigurationError(f"sinks.kafka.key: {key!r} must be one of {list(KEY_MODES)}")
        kafka = _import_confluent_kafka()
        self.topic = topic
        self.key_mode = key
        self.close_timeout = close_timeout
        self._lock = threading.Lock()
        self._counters = {"queued": 0, "delivered": 0, "failed": 0, "dropped": 0, "undelivered": 0}
        self.last_error: str | None = None
        self._last_log: dict[str, float] = {}
        settings = producer_config(bootstrap_servers, config or {})
        settings["on_delivery"] = self._on_delivery
        settings["error_cb"] = self._on_error
        settings["logger"] = logging.getLogger(f"{__name__}.librdkafka")
        try:
            self._producer = kafka.Producer(settings)
        except (kafka.KafkaException, ValueError, TypeError) as exc:
            raise ConfigurationError(f"sinks.kafka.config: librdkafka refused the configuration: {exc}") from exc
        self._kafka_exception: type[BaseException] = kafka.KafkaException
        self._closed = False
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="oisp-kafka-poll", daemon=True)
        self._poller.start()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> KafkaSink:
        """Build from configuration: ``bootstrap_servers`` (required), ``topic``, ``key``, ``config``,
        ``close_timeout``."""
        o = Options("kafka", options, _OPTIONS)
        servers: Any = options.get("bootstrap_servers")
        if isinstance(servers, list) and servers and all(isinstance(s, str) and s for s in servers):
            servers = ",".join(servers)
        elif servers is None:
            o.string("bootstrap_servers", required="the brokers to connect to first, host:port[,host:port...]")
        elif not isinstance(servers, str) or not servers:
            raise ConfigurationError(
                f"sinks.kafka.bootstrap_servers: {servers!r} must be a string (host:port,...) or a list of them")
        topic = o.string("topic", "oisp-events")
        assert topic is not None
        return cls(servers, topic=topic, key=o.choice("key", "process", KEY_MODES),
                   config=o.table("config", (str, int, float, bool)),
                   close_timeout=o.seconds("close_timeout", 10.0, allow_zero=True))

    # Sink ---------------------------------------------------------------------------------------
    def write(self, events: Sequence[Event]) -> None:
        """Queue ``events`` in librdkafka; never waits (a full queue drops, counted)."""
        if self._closed:
            raise OispError(f"sinks.kafka: topic {self.topic} is closed; write() was called after close()")
        produce = self._producer.produce
        topic = self.topic
        mode = self.key_mode
        queued = dropped = failed = 0
        for event in events:
            value = event.to_json().encode("utf-8")
            key = message_key(event, mode)
            try:
                produce(topic, value, key)
                queued += 1
            except BufferError:
                dropped += 1
            except self._kafka_exception as exc:  # e.g. a message larger than message.max.bytes
                failed += 1
                self.last_error = str(exc)
                self._log_rarely("produce", "sinks.kafka: an event could not be produced: %s", exc)
        with self._lock:
            self._counters["queued"] += queued
            self._counters["dropped"] += dropped
            self._counters["failed"] += failed
        if dropped:
            self._log_rarely("full", "sinks.kafka: librdkafka's queue is full (brokers down or too slow); "
                                     "%d event(s) dropped in this batch, %d so far", dropped, self._counters["dropped"])

    def close(self) -> None:
        """Deliver what is queued for at most ``close_timeout`` seconds; what is left counts as ``undelivered``."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._poller.join()
        left = self._producer.flush(self.close_timeout)
        with self._lock:
            self._counters["undelivered"] = left
        if left:
            logger.warning("sinks.kafka: %d event(s) still undelivered to topic %s after %.1f s; given up", left,
                           self.topic, self.close_timeout)

    def stats(self) -> dict[str, int]:
        """The sink's counters (events): ``queued`` (accepted by librdkafka), ``delivered`` (acknowledged by the
        brokers), ``failed``, ``dropped`` (queue full), ``undelivered`` (left at close) and ``in_queue``."""
        with self._lock:
            counters = dict(self._counters)
        if not self._closed:
            counters["in_queue"] = len(self._producer)
        else:
            counters["in_queue"] = counters["undelivered"]
        return counters

    # callbacks ----------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        poll = self._producer.poll
        while not self._stop.is_set():
            poll(_POLL_INTERVAL)

    def _on_delivery(self, error: Any, message: Any) -> None:
        if error is None:
            with self._lock:
                self._counters["delivered"] += 1
            return
        with self._lock:
            self._counters["failed"] += 1
        self.last_error = str(error)
        self._log_rarely("delivery", "sinks.kafka: delivery to topic %s failed: %s", self.topic, error)

    def _on_error(self, error: Any) -> None:
        self.last_error = str(error)
        fatal = getattr(error, "fatal", lambda: False)()
        if fatal:
            logger.error("sinks.kafka: fatal producer error: %s", error)
        else:
            self._log_rarely(f"error-{getattr(error, 'code', lambda: 0)()}", "sinks.kafka: %s", error)

    def _log_rarely(self, what: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log.get(what, -_LOG_EVERY) >= _LOG_EVERY:
            self._last_log[what] = now
            logger.warning(message, *args)

