"""Network namespaces (Linux): naming the one a thread is in, holding on to it, and running code inside another.

A network namespace is per thread. The interceptor diverts on the interfaces of the namespace its thread is in,
so that is where a diverted client's socket lives; it holds that namespace open (:func:`hold_current`) and hands
a :class:`NetworkNamespace` to whoever must look the client's socket up. Such a lookup opens its kernel socket
inside the namespace with :func:`run_inside`: a socket belongs to the namespace it was created in for its whole
life, so it is created once, in a short-lived thread of its own that enters the namespace and then ends, and
kept. No other thread of the process ever changes namespace.

Elsewhere than Linux there are no namespace files: :func:`hold_current` and :func:`current_identity` give None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import attrs

__all__ = ["HeldNamespace", "NetworkNamespace", "current_identity", "hold_current", "run_inside"]

_THREAD_SELF = "/proc/thread-self/ns/net"
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


@attrs.frozen
class NetworkNamespace:
    """A network namespace: a file this process can open to enter it, and its identity (device and inode of
    the namespace file, the same for every file that names it), checked on every opening."""

    path: str
    identity: tuple[int, int]


def current_identity() -> tuple[int, int] | None:
    """The identity of the calling thread's network namespace, or None where there are no namespace files."""
    try:
        st = os.stat(_THREAD_SELF)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@attrs.define
class HeldNamespace:
    """The calling thread's network namespace, kept open (so its :attr:`namespace` path stays valid) until
    :meth:`close`."""

    namespace: NetworkNamespace
    _fd: int

    def close(self) -> None:
        """Let go of the namespace (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


#: O_CLOEXEC where the platform has it (namespace files exist on Linux only; elsewhere the open fails first).
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def hold_current() -> HeldNamespace | None:
    """Hold the calling thread's network namespace open; None where there are no namespace files."""
    try:
        fd = os.open(_THREAD_SELF, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    return HeldNamespace(NetworkNamespace(f"/proc/{os.getpid()}/fd/{fd}", (st.st_dev, st.st_ino)), fd)


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_inside(namespace: NetworkNamespace, make: Callable[[], _T], *, timeout: float = 5.0) -> _T:
    """``make()`` called in a new thread that has entered ``namespace`` (and ends right after): for creating
    sockets that belong to that namespace. Raises ``OSError`` when the namespace cannot be entered (gone, not
    the same namespace any more, no privilege)."""
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def inside() -> None:
        try:
            fd = os.open(namespace.path, os.O_RDONLY | _CLOEXEC)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != namespace.identity:
                    raise OSError(errno.ESTALE, f"{namespace.path} no longer names the namespace it did")
                _setns(fd)
            finally:
                os.close(fd)
            outcome.append(make())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    thread = threading.Thread(target=inside, name="oisp-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    if failure:
        raise failure[0]
    if not outcome:
        raise OSError(errno.ETIMEDOUT, f"entering the network namespace {namespace.path} took too long")
    return outcome[0]
