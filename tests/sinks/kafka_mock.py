"""librdkafka's own mock Kafka cluster, driven from Python through ctypes (confluent-kafka-python does not expose
it): real Kafka-protocol brokers on loopback inside this process, no JVM.

The cluster is created with ``rd_kafka_mock_cluster_new`` on a handle of its own, from the very librdkafka that
confluent-kafka bundles; any client (the sink's producer, a test consumer) reaches it at :attr:`bootstrap_servers`.
``broker_down``/``broker_up`` (``rd_kafka_mock_broker_set_down``/``_up``) disconnect a broker and refuse new
connections, then accept them again: a broker that goes away and comes back.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from types import TracebackType
from typing import Self

import confluent_kafka

_RD_KAFKA_PRODUCER = 0


def _library() -> ctypes.CDLL:
    package = Path(confluent_kafka.__file__).parent
    candidates = sorted(glob.glob(str(package.parent / "confluent_kafka.libs" / "librdkafka*.so*"))
                        + glob.glob(str(package / ".dylibs" / "librdkafka*.dylib"))
                        + glob.glob(str(package.parent / "confluent_kafka.libs" / "librdkafka*.dylib")))
    if not candidates:  # a confluent-kafka built against a system librdkafka
        candidates = ["librdkafka.so.1"]
    lib = ctypes.CDLL(candidates[0], mode=os.RTLD_NOW | getattr(os, "RTLD_GLOBAL", 0))
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_size_t]
    lib.rd_kafka_conf_set.restype = ctypes.c_int
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
    lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_down.restype = ctypes.c_int
    lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_up.restype = ctypes.c_int
    return lib


class MockCluster:
    """A mock Kafka cluster of ``brokers`` brokers (ids 1..n) on loopback; a context manager."""

    def __init__(self, brokers: int = 1) -> None:
        self._lib = _library()
        conf = self._lib.rd_kafka_conf_new()
        errstr = ctypes.create_string_buffer(512)
        # The handle only hosts the cluster; it talks to no broker and logs nothing.
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, len(errstr))
        self._rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not self._rk:
            raise RuntimeError(f"rd_kafka_new: {errstr.value.decode()}")
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._cluster:
            self._lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self.bootstrap_servers: str = self._lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def create_topic(self, name: str, partitions: int = 1, replication: int = 1) -> None:
        err = self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, replication)
        if err:
            raise RuntimeError(f"rd_kafka_mock_topic_create({name}): error {err}")

    def broker_down(self, broker_id: int = 1) -> None:
        err = self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker_id)
        if err:
            raise RuntimeError(f"rd_kafka_mock_broker_set_down({broker_id}): error {err}")

    def broker_up(self, broker_id: int = 1) -> None:
        err = self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker_id)
        if err:
            raise RuntimeError(f"rd_kafka_mock_broker_set_up({broker_id}): error {err}")

    def close(self) -> None:
        if self._cluster:
            self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
            self._cluster = None
        if self._rk:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
