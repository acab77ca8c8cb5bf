"""``webhook`` sink: NDJSON batches POSTed to an HTTPS endpoint, at least once, through a durable on-disk spool.

:meth:`WebhookSink.write` turns the events into batches of at most ``batch_size`` lines (``Event.to_json()``,
one per line, each carrying its ``event_id`` for de-duplication) and puts each batch in the spool directory as a
file of its own: written to a temporary name, fsync'd, renamed to ``<sequence>-<events>.ndjson`` and the directory
fsync'd. Only then does ``write`` return: an event whose ``write`` returned survives a crash of oisp (``kill -9``
included) and is delivered after the next start.

A delivery thread POSTs the spooled batches, oldest first and one at a time (so in order), and deletes each
after a 2xx answer. Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential backoff and
jitter (``retry_base`` doubling up to ``retry_max``), or after the ``Retry-After`` the receiver asked for; any
other answer rejects the batch (it is deleted, counted in ``rejected`` and logged). The spool holds at most
``spool_max_bytes``: beyond it the oldest batches are deleted and their events counted in ``dropped``. Nothing
here blocks the capture: ``write`` only writes local files.

With a ``secret``, every request carries ``X-OISP-Signature: sha256=<hex>``, the HMAC-SHA256 of the exact body
under the secret. HTTPS certificates are verified against the system's CAs plus ``ca_file`` if given, as the
proxy verifies upstreams with ``upstream_ca``.

``close()`` keeps delivering for up to ``close_timeout`` seconds; what is still undelivered stays in the spool
for the next start, which delivers it before anything newer.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oisp._version import __version__
from oisp.errors import ConfigurationError, OispError
from oisp.events import Event
from oisp.sinks._delivery import Outcome, RetryPolicy, SpoolEntry, SpoolIndex, classify_status, parse_retry_after
from oisp.sinks._files import PRIVATE_DIR_MODE, fsync_directory, remove_quietly
from oisp.sinks._options import Options
from oisp.sinks.jsonl import _make_private_dirs

__all__ = ["SIGNATURE_HEADER", "WebhookSink", "sign"]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-OISP-Signature"
_OPTIONS = ("url", "headers", "secret", "batch_size", "spool_dir", "spool_max_bytes", "timeout", "retry_base",
            "retry_max", "close_timeout", "ca_file", "fsync")
_FILE_MODE = 0o600
_DIR_MODE = PRIVATE_DIR_MODE
_LOCK_NAME = ".lock"
_TMP_SUFFIX = ".tmp"
#: Headers the sink sets itself; ``headers`` cannot replace them.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "connection",
                               SIGNATURE_HEADER.lower()})


def sign(secret: bytes, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body``: ``sha256=`` and the hex HMAC-SHA256 under ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    """POSTs events as NDJSON batches to ``url``, through the durable spool in ``spool_dir`` (see the module)."""

    def __init__(
        self,
        url: str,
        *,
        spool_dir: str | os.PathLike[str],
        headers: Mapping[str, str] | None = None,
        secret: str | None = None,
        batch_size: int = 500,
        spool_max_bytes: int = 1 << 30,
        timeout: float = 10.0,
        retry_base: float = 0.5,
        retry_max: float = 60.0,
        close_timeout: float = 10.0,
        ca_file: str | os.PathLike[str] | None = None,
        fsync: bool = True,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigurationError(f"sinks.webhook.url: {url!r} must be an https:// (or http://) URL with a host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"sinks.webhook.url: {url!r}: {exc}") from exc
        self.url = url
        #: The URL as logs show it: scheme, host and port only (webhook paths and queries often are the secret).
        self.shown_url = f"{parts.scheme}://{parts.hostname}{f':{port}' if port else ''}/..."
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            logger.warning("sinks.webhook.url %s is plain HTTP: events travel unencrypted", self.shown_url)
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/x-ndjson", "User-Agent": f"oisp/{__version__}"}
        for key, value in (headers or {}).items():
            if key.lower() in _RESERVED_HEADERS:
                raise ConfigurationError(f"sinks.webhook.headers.{key}: set by the sink, cannot be configured")
            if any(c in key + value for c in "\r\n\0"):
                raise ConfigurationError(f"sinks.webhook.headers.{key}: contains a line break or NUL")
            self._headers[key] = value
        self._secret = secret.encode("utf-8") if secret is not None else None
        self.batch_size = batch_size
        self.timeout = timeout
        self.close_timeout = close_timeout
        self.fsync = fsync
        self._policy = RetryPolicy(base=retry_base, cap=max(retry_max, retry_base))
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if ca_file is not None:
                try:
                    self._ssl.load_verify_locations(cafile=os.path.expanduser(os.fspath(ca_file)))
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigurationError(f"sinks.webhook.ca_file: cannot load {ca_file}: {exc}") from exc
        elif ca_file is not None:
            raise ConfigurationError("sinks.webhook.ca_file: only meaningful with an https:// url")

        self.spool_dir = Path(spool_dir).expanduser()
        self._index = SpoolIndex(max_bytes=spool_max_bytes)
        self._lock_fd: int | None = None
        self._open_spool()

        self._cond = threading.Condition()
        self._busy: SpoolEntry | None = None
        self._closed = False
        self._closing = False
        self._close_deadline = 0.0
        self._conn: http.client.HTTPConnection | None = None
        self._failing_since: float | None = None
        self._counters = {"spooled": 0, "delivered": 0, "dropped": 0, "rejected": 0, "retries": 0,
                          "batches_delivered": 0}
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._deliver_loop, name="oisp-webhook", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> WebhookSink:
        """Build from configuration (see the module and ``docs/export.md`` for the options)."""
        o = Options("webhook", options, _OPTIONS)
        url = o.string("url", required="the https:// URL batches are POSTed to")
        spool_dir = o.string("spool_dir", required="a directory for undelivered batches, kept across restarts")
        assert url is not None and spool_dir is not None
        headers = o.table("headers", (str,))
        secret = o.string("secret")
        ca_file = o.string("ca_file")
        fsync = options.get("fsync", True)
        if not isinstance(fsync, bool):
            raise ConfigurationError(f"sinks.webhook.fsync: {fsync!r} must be true or false")
        return cls(
            url, spool_dir=spool_dir, headers=headers, secret=secret, ca_file=ca_file, fsync=fsync,
            batch_size=o.integer("batch_size", 500),
            spool_max_bytes=o.integer("spool_max_bytes", 1 << 30),
            timeout=o.seconds("timeout", 10.0),
            retry_base=o.seconds("retry_base", 0.5),
            retry_max=o.seconds("retry_max", 60.0),
            close_timeout=o.seconds("close_timeout", 10.0, allow_zero=True),
        )

    # Sink ---------------------------------------------------------------------------------------
    def write(self, events: Sequence[Event]) -> None:
        """Spool ``events`` durably (in batches of ``batch_size``); returns once they are on disk."""
        if self._closed:
            raise OispError(f"sinks.webhook: {self.shown_url} is closed; write() was called after close()")
        lines = [event.to_json().encode("utf-8") + b"\n" for event in events]
        if not lines:
            return
        added: list[SpoolEntry] = []
        try:
            for start in range(0, len(lines), self.batch_size):
                chunk = lines[start:start + self.batch_size]
                with self._cond:
                    seq = self._index.allocate()
                added.append(self._spool(seq, b"".join(chunk), len(chunk)))
            if self.fsync:
                fsync_directory(self.spool_dir)
        except BaseException:
            # All or nothing: the pipeline counts the whole batch as failed, so none of it may be sent later.
            for entry in added:
                remove_quietly(self.spool_dir / entry.name, "sinks.webhook")
            raise
        with self._cond:
            for entry in added:
                self._index.add(entry)
            self._counters["spooled"] += len(lines)
            dropped = self._index.over_bound(self._busy)
            for entry in dropped:
                self._counters["dropped"] += entry.count
                remove_quietly(self.spool_dir / entry.name, "sinks.webhook")
            self._cond.notify_all()
        if dropped:
            logger.warning("sinks.webhook: spool %s is over spool_max_bytes (%d); dropped the %d oldest batch(es), "
                           "%d event(s)", self.spool_dir, self._index.max_bytes, len(dropped),
                           sum(e.count for e in dropped))

    def close(self) -> None:
        """Deliver what is spooled for up to ``close_timeout`` seconds, then stop; the rest stays spooled."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + self.close_timeout
            self._cond.notify_all()
        self._thread.join(self.close_timeout + self.timeout + 1.0)
        if self._conn is not None and not self._thread.is_alive():
            self._conn.close()
        with self._cond:
            left = self._index.events
        if left:
            logger.warning("sinks.webhook: %d event(s) not yet delivered to %s stay in %s for the next start",
                           left, self.shown_url, self.spool_dir)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def stats(self) -> dict[str, int]:
        """The sink's own counters (events): ``spooled``, ``delivered`` (2xx), ``dropped`` (spool over its bound),
        ``rejected`` (an answer that is not retried), ``retries`` (attempts that failed), ``pending`` (events in
        the spool), ``spool_bytes`` and ``batches_delivered``."""
        with self._cond:
            return dict(self._counters) | {"pending": self._index.events, "spool_bytes": self._index.total_bytes}

    # spool --------------------------------------------------------------------------------------
    def owned_paths(self) -> list[Path]:
        """What this sink writes into after it has started (its spool directory and the files in it): handed to
        the decoder process's user when that process gives up root (see :mod:`oisp.decoder_process.privileges`)."""
        return [self.spool_dir, *sorted(self.spool_dir.iterdir())]

    def _open_spool(self) -> None:
        try:
            _make_private_dirs(self.spool_dir)
            if sys.platform != "win32":  # (not os.name: mypy narrows on sys.platform only)
                mode = self.spool_dir.stat().st_mode & 0o777
                if mode & 0o077:
                    os.chmod(self.spool_dir, _DIR_MODE)
                    logger.warning("%s was open to other users (mode %04o); changed to 0700 because it holds "
                                   "prompts", self.spool_dir, mode)
                import fcntl

                fd = os.open(self.spool_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise ConfigurationError(
                        f"sinks.webhook.spool_dir: {self.spool_dir} is in use by another running oisp (each "
                        "webhook sink needs a spool directory of its own)") from None
                self._lock_fd = fd
            found: list[SpoolEntry] = []
            for path in self.spool_dir.iterdir():
                if path.name.endswith(_TMP_SUFFIX):
                    remove_quietly(path, "sinks.webhook")  # never renamed, so never acknowledged: an interrupted write
                    continue
                entry = SpoolEntry.parse(path.name, path.stat().st_size)
                if entry is not None:
                    found.append(entry)
        except OSError as exc:
            raise ConfigurationError(f"sinks.webhook.spool_dir: cannot use {self.spool_dir}: {exc}") from exc
        self._index.load(found)
        if found:
            logger.info("sinks.webhook: %d batch(es), %d event(s) waiting in %s from an earlier run are delivered "
                        "first", len(found), self._index.events, self.spool_dir)

    def _spool(self, seq: int, body: bytes, count: int) -> SpoolEntry:
        entry = SpoolEntry(seq, count, len(body))
        temporary = self.spool_dir / f"{seq:020d}{_TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(temporary, flags, _FILE_MODE)
        try:
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.spool_dir / entry.name)
        except BaseException:
            remove_quietly(temporary, "sinks.webhook")
            raise
        return entry

    # delivery -----------------------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                while not self._index.entries and not self._closing:
                    self._cond.wait()
                entry = self._index.oldest()
                if entry is None or (self._closing and time.monotonic() >= self._close_deadline):
                    return
                self._busy = entry
            try:
                body = (self.spool_dir / entry.name).read_bytes()
            except OSError as exc:
                logger.error("sinks.webhook: cannot read spooled batch %s (skipped): %s", entry.name, exc)
                with self._cond:
                    self._busy = None
                    if self._index.remove(entry):
                        self._counters["dropped"] += entry.count
                continue
            outcome, retry_after, detail = self._post(body)
            with self._cond:
                self._busy = None
                if outcome is not Outcome.RETRY:
                    if self._index.remove(entry):
                        self._counters["delivered" if outcome is Outcome.DELIVERED else "rejected"] += entry.count
                        if outcome is Outcome.DELIVERED:
                            self._counters["batches_delivered"] += 1
                    remove_quietly(self.spool_dir / entry.name, "sinks.webhook")
                else:
                    self._counters["retries"] += 1
            if outcome is Outcome.REJECTED:
                self.last_error = detail
                logger.error("sinks.webhook: %s rejected a batch of %d event(s) (%s); it is not retried",
                             self.shown_url, entry.count, detail)
            if outcome is not Outcome.RETRY:
                if self._failing_since is not None:
                    logger.warning("sinks.webhook: %s reachable again after %.1f s", self.shown_url,
                                   time.monotonic() - self._failing_since)
                    self._failing_since = None
                attempt = 0
                continue
            attempt += 1
            self.last_error = detail
            delay = self._policy.delay(attempt, retry_after)
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                logger.warning("sinks.webhook: delivery to %s failed (%s); retrying with backoff, events wait in %s",
                               self.shown_url, detail, self.spool_dir)
            else:
                logger.debug("sinks.webhook: attempt %d failed (%s); next in %.2f s", attempt, detail, delay)
            with self._cond:
                wake = time.monotonic() + delay
                while True:
                    now = time.monotonic()
                    limit = min(wake, self._close_deadline) if self._closing else wake
                    if now >= limit:
                        break
                    self._cond.wait(limit - now)

    def _post(self, body: bytes) -> tuple[Outcome, float | None, str]:
        headers = dict(self._headers)
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                conn = self._connection()
                conn.request("POST", self._target, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                break
            except Exception as exc:  # OSError, HTTPException, and anything else: the delivery thread must go on
                self._drop_connection()
                if reused and attempt == 1 and isinstance(exc, OSError | http.client.HTTPException):
                    continue  # a kept-alive connection the receiver had closed meanwhile: once more on a new one
                if not isinstance(exc, OSError | http.client.HTTPException):
                    logger.error("sinks.webhook: unexpected error posting to %s", self.shown_url, exc_info=True)
                return Outcome.RETRY, None, f"{type(exc).__name__}: {exc}"
        if response.will_close:
            self._drop_connection()
        outcome = classify_status(response.status)
        retry_after = None
        if outcome is Outcome.RETRY:
            retry_after = parse_retry_after(response.getheader("Retry-After"), time.time())
        return outcome, retry_after, f"HTTP {response.status} {response.reason}"

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._ssl is not None:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
