"""Which process is behind a connection: pid, executable, command line, user, start time, parent chain, and
the app (IDE, agent, CLI) at the top of that chain.

The pid comes from the interceptor when it knows it (FLOW/SOCKET layer), otherwise from the operating
system's socket table via ``psutil`` (the client side of the connection's 4-tuple). Descriptions are cached by
(pid, create time), so a reused pid is never mistaken for the process that had it before; a process that
exited before it could be described is reported as exited, never guessed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import psutil

from oisp.events import Actor, App, ParentProcess, ProcessInfo, format_ts

__all__ = ["KNOWN_APPS", "Attribution", "Attributor"]

logger = logging.getLogger(__name__)

#: Executable names (lower case, without .exe) of apps known to make AI calls, with how to describe them.
KNOWN_APPS: dict[str, dict[str, Any]] = {
    "cursor": {"app_id": "cursor", "name": "Cursor", "vendor": "Anysphere", "category": "dev_tools", "type": "native"},
    "code": {"app_id": "vscode", "name": "Visual Studio Code", "vendor": "Microsoft", "category": "dev_tools",
             "type": "native", "is_ai_host": True},
    "windsurf": {"app_id": "windsurf", "name": "Windsurf", "vendor": "Codeium", "category": "dev_tools",
                 "type": "native"},
    "zed": {"app_id": "zed", "name": "Zed", "vendor": "Zed Industries", "category": "dev_tools", "type": "native"},
    "claude": {"app_id": "claude-code", "name": "Claude Code", "vendor": "Anthropic", "category": "cli",
               "type": "cli"},
    "codex": {"app_id": "codex-cli", "name": "Codex CLI", "vendor": "OpenAI", "category": "cli", "type": "cli"},
    "aider": {"app_id": "aider", "name": "aider", "category": "cli", "type": "cli"},
    "gemini": {"app_id": "gemini-cli", "name": "Gemini CLI", "vendor": "Google", "category": "cli", "type": "cli"},
    "chatgpt": {"app_id": "chatgpt-desktop", "name": "ChatGPT", "vendor": "OpenAI", "category": "chat",
                "type": "native"},
    "ollama": {"app_id": "ollama", "name": "Ollama", "category": "server", "type": "server"},
}
_MAX_ANCESTORS = 16
#: Longest command line kept for the process itself and for its parent (the rest is cut, marked with "…").
CMDLINE_LIMIT = 4096
PARENT_CMDLINE_LIMIT = 512


@attrs.frozen
class Attribution:
    """The process behind a connection, its user, and the app it belongs to (if known)."""

    process: ProcessInfo
    actor: Actor | None = None
    app: App | None = None


@attrs.define
class _Cached:
    attribution: Attribution


class Attributor:
    """Names the process behind connections; callable as the proxy's ``attributor``.

    ``connections`` returns the socket table (injectable for tests); by default ``psutil.net_connections``.
    """

    def __init__(self, *, cache_size: int = 4096,
                 connections: Callable[[], list[Any]] | None = None) -> None:
        self._cache: OrderedDict[tuple[int, float], _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._connections = connections or (lambda: psutil.net_connections(kind="inet"))
        # /proc lets one socket be found without listing every socket of every process (Linux); the processes
        # that made AI calls before are searched first, since the same agents keep calling. The socket's inode
        # comes from the kernel's sock_diag netlink interface (one exact lookup) while that works, else from
        # /proc/net/tcp, whose text grows with every socket on the machine (milliseconds with a thousand).
        self._procfs = connections is None and _PROC_NET.is_dir()
        self._netlink = self._procfs and hasattr(socket, "AF_NETLINK")
        #: Processes found behind earlier connections (most recent last), with the descriptor the socket had.
        self._recent: OrderedDict[int, str | None] = OrderedDict()

    def __call__(self, client: tuple[str, int], local: tuple[str, int], pid_hint: int | None) -> Attribution | None:
        pid = pid_hint if pid_hint else self.pid_for(client, local)
        if pid is None:
            return None
        return self.describe(pid)

    def recall(self, client: tuple[str, int], local: tuple[str, int], pid_hint: int | None) -> Attribution | None:
        """The attribution when it costs a few system calls: a process described before, found through the
        kernel's socket lookup and the descriptor its last connection had (a client opening connection after
        connection). None when finding it would take the full search of :meth:`__call__` (or it is not here).

        Cheap enough to run on an event loop, where ``__call__`` belongs in a worker thread.
        """
        pid = pid_hint
        if not pid:
            if not self._netlink:
                return None
            try:
                inode = _diag_inode(client, local)
            except (OSError, ValueError):
                return None
            if inode is None:
                return None
            target = f"socket:[{inode}]"
            with self._lock:
                recent = list(reversed(self._recent.items()))
            pid = next((pid for pid, fd in recent if fd is not None and _fd_is(pid, fd, target)), None)
            if pid is None:
                return None
        started = _start_ticks(pid)
        if started is None:
            return None
        with self._lock:
            cached = self._cache.get((pid, started))
            if cached is None:
                return None
            self._cache.move_to_end((pid, started))
            return cached.attribution

    def pid_for(self, client: tuple[str, int], local: tuple[str, int]) -> int | None:
        """The pid owning the client end of a TCP connection to ``local`` (None when not on this machine)."""
        if self._procfs:
            inode = self._inode(client, local)
            if inode is not None:
                pid = self._pid_owning(inode)
                if pid is not None:
                    return pid
        try:
            table = self._connections()
        except (psutil.Error, OSError) as exc:
            logger.debug("socket table unavailable: %s", exc)
            return None
        for conn in table:
            laddr, raddr = conn.laddr, conn.raddr
            if not laddr or not raddr or conn.pid is None:
                continue
            if _same(laddr, client) and _same(raddr, local):
                return int(conn.pid)
        return None

    def _inode(self, client: tuple[str, int], local: tuple[str, int]) -> int | None:
        if self._netlink:
            try:
                return _diag_inode(client, local)
            except (OSError, ValueError) as exc:  # no sock_diag here (a sandbox, an old kernel): stop asking it
                logger.debug("sock_diag unavailable (%s); reading /proc/net/tcp instead", exc)
                self._netlink = False
        return _socket_inode(client, local)

    def _pid_owning(self, inode: int) -> int | None:
        target = f"socket:[{inode}]"
        with self._lock:
            recent = list(reversed(self._recent.items()))
        # A client that opens connection after connection usually gets the same descriptor number for each (the
        # lowest free one): that one descriptor of each recent process is looked at first, then all of them.
        for pid, fd in recent:
            if fd is not None and _fd_is(pid, fd, target):
                self._remember(pid, fd)
                return pid
        ordered = [pid for pid, _ in recent] + [pid for pid in _all_pids() if pid not in self._recent]
        for pid in ordered:
            fd = _fd_of(pid, target)
            if fd is not None:
                self._remember(pid, fd)
                return pid
        return None

    def _remember(self, pid: int, fd: str) -> None:
        with self._lock:
            self._recent[pid] = fd
            self._recent.move_to_end(pid)
            while len(self._recent) > 64:
                self._recent.popitem(last=False)

    def describe(self, pid: int) -> Attribution:
        """Describe a process (cached by pid and start time)."""
        started = _start_ticks(pid) if self._procfs else None
        if started is not None:  # Linux: the start time straight from /proc/PID/stat, a third of psutil's cost
            key: tuple[int, float] = (pid, started)
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached.attribution
        try:
            proc = psutil.Process(pid)
            if started is None:
                key = (pid, proc.create_time())
        except psutil.NoSuchProcess:
            return Attribution(ProcessInfo(pid=pid, extra={"state": "exited"}))
        except psutil.Error as exc:
            return Attribution(ProcessInfo(pid=pid, extra={"state": f"inaccessible: {type(exc).__name__}"}))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached.attribution
        attribution = self._describe(proc)
        with self._lock:
            self._cache[key] = _Cached(attribution)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return attribution

    def _describe(self, proc: psutil.Process) -> Attribution:
        try:
            with proc.oneshot():
                info = proc.as_dict(["ppid", "exe", "name", "cmdline", "cwd", "username", "uids", "gids",
                                     "create_time", "terminal"])
        except psutil.NoSuchProcess:
            return Attribution(ProcessInfo(pid=proc.pid, extra={"state": "exited"}))
        cmdline = info.get("cmdline") or None
        ancestors = _ancestors(proc)
        process = ProcessInfo(
            pid=proc.pid, ppid=info.get("ppid"), exe=info.get("exe") or None, name=info.get("name") or None,
            cmdline=_cmdline_text(cmdline, CMDLINE_LIMIT),
            cmdline_args=list(cmdline) if cmdline and len(" ".join(cmdline)) <= CMDLINE_LIMIT else None,
            cwd=info.get("cwd") or None,
            start_time=format_ts(datetime.fromtimestamp(info["create_time"], UTC)) if info.get("create_time")
            else None,
            parent=ancestors[0] if ancestors else None, ancestors=ancestors or None,
        )
        uids = info.get("uids")
        gids = info.get("gids")
        actor = Actor(uid=getattr(uids, "real", None), gid=getattr(gids, "real", None),
                      user=info.get("username") or None, terminal=info.get("terminal") or None,
                      is_elevated=getattr(uids, "effective", None) == 0 if uids is not None else None)
        return Attribution(process, actor, _app_for(process, ancestors))


_PROC_NET = Path("/proc/net")


def _hex_endpoint(address: tuple[str, int]) -> tuple[str, str]:
    """The (address, port) of a socket as ``/proc/net/tcp{,6}`` writes them (IPv4 as IPv4-mapped IPv6 in tcp6)."""
    ip = ipaddress.ip_address(_norm_ip(address[0]))
    port = f"{address[1]:04X}"
    if ip.version == 4:
        return socket.inet_pton(socket.AF_INET, str(ip))[::-1].hex().upper(), port
    packed = socket.inet_pton(socket.AF_INET6, str(ip))
    words = b"".join(packed[i:i + 4][::-1] for i in range(0, 16, 4))
    return words.hex().upper(), port


def _mapped(address: tuple[str, int]) -> tuple[str, int] | None:
    ip = ipaddress.ip_address(_norm_ip(address[0]))
    return (f"::ffff:{ip}", address[1]) if ip.version == 4 else None


def _socket_inode(client: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The inode of the TCP socket whose local end is ``client`` and remote end ``local`` (from /proc/net)."""
    candidates = [(_hex_endpoint(client), _hex_endpoint(local), "tcp")]
    mapped_client, mapped_local = _mapped(client), _mapped(local)
    if mapped_client and mapped_local:
        candidates.append((_hex_endpoint(mapped_client), _hex_endpoint(mapped_local), "tcp6"))
    elif ":" in client[0]:
        candidates = [(_hex_endpoint(client), _hex_endpoint(local), "tcp6")]
    for (caddr, cport), (laddr, lport), table in candidates:
        want_local, want_remote = f"{caddr}:{cport}", f"{laddr}:{lport}"
        try:
            with open(_PROC_NET / table, encoding="ascii") as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                        return int(fields[9]) or None
        except OSError:
            continue
    return None


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HEADER = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, extensions, pad, states; then inet_diag_sockid: source and destination
#: port (network order), source and destination address (16 bytes each), interface, cookie (two words).
_DIAG_REQUEST = struct.Struct("=BBBBIHH16s16sIII")
#: inet_diag_msg: family, state, timer, retransmits, the sockid (48 bytes), expires, rqueue, wqueue, uid, inode.
_DIAG_MESSAGE = struct.Struct("=BBBB48sIIIII")
_NO_COOKIE = 0xFFFFFFFF


def _diag_inode(client: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The inode of the TCP socket whose local end is ``client`` and remote end ``local``, asked of the kernel
    with one exact sock_diag lookup (Linux; cost independent of how many sockets exist). None when no such socket
    exists (not on this machine); raises ``OSError`` when the interface is not available."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.EAFNOSUPPORT, "sock_diag is Linux-only")
    source, destination = ipaddress.ip_address(_norm_ip(client[0])), ipaddress.ip_address(_norm_ip(local[0]))
    if source.version != destination.version:
        return None
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF, socket.htons(client[1]),
                                 socket.htons(local[1]),
                                 source.packed.ljust(16, b"\0"), destination.packed.ljust(16, b"\0"), 0,
                                 _NO_COOKIE, _NO_COOKIE)
    message = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        sock.sendto(message + request, (0, 0))
        reply = sock.recv(8192)
    if len(reply) < _NLMSG_HEADER.size:
        raise ValueError("short sock_diag reply")
    _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, _NLMSG_HEADER.size)[0]
        if error == errno.ENOENT:
            return None  # no such socket: the client is not on this machine
        raise OSError(error, os.strerror(error))
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _NLMSG_HEADER.size + _DIAG_MESSAGE.size:
        raise ValueError(f"unexpected sock_diag reply (type {kind})")
    inode: int = _DIAG_MESSAGE.unpack_from(reply, _NLMSG_HEADER.size)[-1]
    return inode or None


def _start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (field 22 of /proc/PID/stat); None if unreadable.

    Together with the pid this names one process: a reused pid has a later start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        # The command name (field 2) is in parentheses and may hold anything, so count from the last ")".
        return int(data[data.rindex(b")") + 2:].split(b" ", 20)[19])
    except (OSError, ValueError, IndexError):
        return None


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _fd_of(pid: int, target: str) -> str | None:
    """The descriptor (its name in /proc/PID/fd) through which ``pid`` holds ``target``, or None."""
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"{directory}/{name}") == target:
                return name
        except OSError:
            continue
    return None


def _fd_is(pid: int, fd: str, target: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == target
    except OSError:
        return False


def _same(address: Any, expected: tuple[str, int]) -> bool:
    ip, port = address[0], address[1]
    if port != expected[1]:
        return False
    return _norm_ip(ip) == _norm_ip(expected[0])


def _norm_ip(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def _ancestors(proc: psutil.Process) -> list[ParentProcess]:
    chain: list[ParentProcess] = []
    current = proc
    for _ in range(_MAX_ANCESTORS):
        try:
            parent = current.parent()
            if parent is None:
                break
            with parent.oneshot():
                # Only the direct parent's command line is kept (shortened): higher up, command lines tend to
                # carry whole environments and session tokens, and the chain of names is what identifies an app.
                cmdline = _cmdline_text(parent.cmdline(), PARENT_CMDLINE_LIMIT) if not chain else None
                chain.append(ParentProcess(pid=parent.pid, exe=_safe(parent.exe), name=parent.name(),
                                           cmdline=cmdline))
        except psutil.Error:
            break
        if parent.pid in (0, 1):
            break
        current = parent
    return chain


def _cmdline_text(args: list[str] | None, limit: int) -> str | None:
    if not args:
        return None
    text = " ".join(args)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe(getter: Callable[[], str]) -> str | None:
    try:
        return getter() or None
    except psutil.Error:
        return None


def _app_key(name: str | None, exe: str | None) -> str | None:
    for candidate in (name, os.path.basename(exe) if exe else None):
        if not candidate:
            continue
        key = candidate.lower().removesuffix(".exe")
        if key in KNOWN_APPS:
            return key
    return None


def _app_for(process: ProcessInfo, ancestors: list[ParentProcess]) -> App | None:
    """The outermost known app in the chain (an IDE that started an agent that made the call), else the process."""
    found: str | None = None
    chain: list[ProcessInfo | ParentProcess] = [process, *ancestors]
    for item in chain:
        key = _app_key(item.name, item.exe)
        if key is not None:
            found = key
    if found is None:
        return None
    return App(**KNOWN_APPS[found], tier="identified", is_ai_app=True)
