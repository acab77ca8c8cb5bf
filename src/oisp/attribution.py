"""Which process is behind a connection: pid, executable, command line, user, start time, parent chain, and
the app (agent, IDE, CLI) the chain belongs to (:mod:`oisp.apps`).

The pid is found, in this order (:class:`PidSource` names each way, and the attribution says which one found it):

1. from the interceptor, when its FLOW/SOCKET layers saw the connection open (``flow_layer``);
2. for a diverted connection, from the client's own socket, looked up by the connection's original 4-tuple (the
   client's address and the original destination, from the interceptor's NAT table) in the network namespace
   the client is in: with sock_diag (``sock_diag_original``), else in ``/proc/net/tcp`` (``proc_net_original``);
   the socket's inode then leads to the process holding it;
3. from the addresses the proxy sees on its accepted socket, which are the client's own unless a NAT rewrote
   them (explicit and reverse modes): sock_diag (``sock_diag``), ``/proc/net/tcp`` (``proc_net``), or the
   socket table of ``psutil`` (``socket_table``).

Descriptions are cached by (pid, start time), so a reused pid is never mistaken for the process that had it
before; a process that exited before it could be described is reported as exited, never guessed.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import psutil

from oisp import netns
from oisp.apps import AppTable
from oisp.events import Actor, App, ParentProcess, ProcessInfo, format_ts
from oisp.sockdiag import NamespaceSockDiag
from oisp.sockdiag import diag_inode as _diag_inode

__all__ = ["KNOWN_APPS", "Attribution", "Attributor", "ClientSocket", "PidSource"]

logger = logging.getLogger(__name__)

#: Executable names (lower case, without .exe) of apps known to make AI calls, with how to describe them. Kept for
#: code that reads it; apps are recognised with :class:`oisp.apps.AppTable` (``oisp/data/apps.json``).
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


class PidSource(enum.StrEnum):
    """How the pid behind a connection was found (``attrs["oisp.pid_source"]`` of ``network.connect``)."""

    #: The interceptor's FLOW/SOCKET layers reported the process that opened the connection.
    FLOW_LAYER = "flow_layer"
    #: The client's socket, found with sock_diag by the original 4-tuple the interceptor's NAT table kept.
    SOCK_DIAG_ORIGINAL = "sock_diag_original"
    #: The same, found in ``/proc/net/tcp{,6}`` (no sock_diag here).
    PROC_NET_ORIGINAL = "proc_net_original"
    #: The client's socket, found with sock_diag by the addresses the proxy sees.
    SOCK_DIAG = "sock_diag"
    #: The same, found in ``/proc/net/tcp{,6}``.
    PROC_NET = "proc_net"
    #: The same, found in the system's socket table (``psutil.net_connections``; other platforms).
    SOCKET_TABLE = "socket_table"


@attrs.frozen
class ClientSocket:
    """The client's end of a diverted connection as the client's own socket has it (the NAT rewrote what the
    proxy sees): its own address, the address it connected to (the original destination), and the network
    namespace it is in (None: the one this process's lookups run in)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    namespace: netns.NetworkNamespace | None = None


@attrs.frozen
class Attribution:
    """The process behind a connection, its user, the app it belongs to (if known), and how its pid was found
    (None for a description asked for by pid)."""

    process: ProcessInfo
    actor: Actor | None = None
    app: App | None = None
    pid_source: PidSource | None = None


@attrs.define
class _Cached:
    attribution: Attribution
    #: The same attribution with each pid source it was found through (built once each).
    sourced: dict[PidSource, Attribution] = attrs.field(factory=dict)

    def found_by(self, source: PidSource | None) -> Attribution:
        if source is None:
            return self.attribution
        known = self.sourced.get(source)
        if known is None:
            known = self.sourced[source] = attrs.evolve(self.attribution, pid_source=source)
        return known


class Attributor:
    """Names the process behind connections; callable as the proxy's ``attributor``.

    ``connections`` returns the socket table (injectable for tests); by default ``psutil.net_connections``.
    ``apps`` recognises the app of a process (:class:`~oisp.apps.AppTable`).
    """

    def __init__(self, *, cache_size: int = 4096,
                 connections: Callable[[], list[Any]] | None = None, apps: AppTable | None = None) -> None:
        #: Recognises the app of a process (the built-in table unless given one with plugins' apps).
        self.apps = apps if apps is not None else AppTable()
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
        #: sock_diag sockets of other network namespaces (by namespace identity); None where one failed.
        self._namespaces: dict[tuple[int, int], NamespaceSockDiag | None] = {}
        self._own_namespace = netns.current_identity() if self._procfs else None

    def __call__(self, client: tuple[str, int], local: tuple[str, int], pid_hint: int | None, *,
                 original: ClientSocket | None = None) -> Attribution | None:
        found = self.locate(client, local, pid_hint, original=original)
        if found is None:
            return None
        pid, source = found
        return self.describe(pid, source=source)

    def recall(self, client: tuple[str, int], local: tuple[str, int], pid_hint: int | None, *,
               original: ClientSocket | None = None) -> Attribution | None:
        """The attribution when it costs a few system calls: a process described before, found through the
        kernel's socket lookup and the descriptor its last connection had (a client opening connection after
        connection). None when finding it would take the full search of :meth:`__call__` (or it is not here).

        Cheap enough to run on an event loop, where ``__call__`` belongs in a worker thread.
        """
        pid, source = pid_hint, PidSource.FLOW_LAYER
        if not pid:
            if not self._netlink:
                return None
            try:
                if original is not None:
                    inode, source = self._original_inode(original, proc_net=False)
                else:
                    inode, source = _diag_inode(client, local), PidSource.SOCK_DIAG
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
            return cached.found_by(source)

    def pid_for(self, client: tuple[str, int], local: tuple[str, int]) -> int | None:
        """The pid owning the client end of a TCP connection to ``local`` (None when not on this machine)."""
        found = self.locate(client, local, None)
        return found[0] if found is not None else None

    def locate(self, client: tuple[str, int], local: tuple[str, int], pid_hint: int | None, *,
               original: ClientSocket | None = None) -> tuple[int, PidSource] | None:
        """The pid behind a connection and how it was found (see the module's description for the order), or
        None when it is not on this machine. ``client``/``local`` are the addresses the proxy sees;
        ``original`` the client's own socket, when the interceptor's NAT table knows it."""
        if pid_hint:
            return pid_hint, PidSource.FLOW_LAYER
        if original is not None and self._procfs:
            try:
                inode, source = self._original_inode(original, proc_net=True)
            except (OSError, ValueError) as exc:
                logger.debug("original-tuple lookup of %s:%d failed: %s", *original.local, exc)
                inode = None
            if inode is not None:
                pid = self._pid_owning(inode)
                if pid is not None:
                    return pid, source
        if self._procfs:
            inode, source = self._inode(client, local)
            if inode is not None:
                pid = self._pid_owning(inode)
                if pid is not None:
                    return pid, source
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
                return int(conn.pid), PidSource.SOCKET_TABLE
        return None

    def _original_inode(self, original: ClientSocket, *, proc_net: bool) -> tuple[int | None, PidSource]:
        """The inode of the client's own socket, looked up in its network namespace by its own 4-tuple.
        ``/proc/net`` (of this namespace only) is read when sock_diag is unavailable and ``proc_net`` allows."""
        namespace = original.namespace
        if namespace is not None and namespace.identity != self._own_namespace:
            diag = self._namespace_diag(namespace)
            if diag is None:
                return None, PidSource.SOCK_DIAG_ORIGINAL
            return diag.inode(original.local, original.remote), PidSource.SOCK_DIAG_ORIGINAL
        inode, source = self._inode(original.local, original.remote, allow_proc_net=proc_net)
        return inode, (PidSource.SOCK_DIAG_ORIGINAL if source is PidSource.SOCK_DIAG
                       else PidSource.PROC_NET_ORIGINAL)

    def _namespace_diag(self, namespace: netns.NetworkNamespace) -> NamespaceSockDiag | None:
        with self._lock:
            if namespace.identity in self._namespaces:
                return self._namespaces[namespace.identity]
        try:
            diag: NamespaceSockDiag | None = NamespaceSockDiag(namespace)
        except OSError as exc:
            logger.warning("cannot look sockets up in the network namespace of %s (%s): connections from there "
                           "are attributed by the addresses the proxy sees", namespace.path, exc)
            diag = None
        with self._lock:
            known = self._namespaces.setdefault(namespace.identity, diag)
        if known is not diag and diag is not None:
            diag.close()  # another thread opened one first
        return known

    def _inode(self, client: tuple[str, int], local: tuple[str, int], *,
               allow_proc_net: bool = True) -> tuple[int | None, PidSource]:
        if self._netlink:
            try:
                return _diag_inode(client, local), PidSource.SOCK_DIAG
            except (OSError, ValueError) as exc:  # no sock_diag here (a sandbox, an old kernel): stop asking it
                logger.debug("sock_diag unavailable (%s); reading /proc/net/tcp instead", exc)
                self._netlink = False
        if not allow_proc_net:
            return None, PidSource.PROC_NET
        return _socket_inode(client, local), PidSource.PROC_NET

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

    def describe(self, pid: int, *, source: PidSource | None = None) -> Attribution:
        """Describe a process (cached by pid and start time); ``source`` says how its pid was found."""
        started = _start_ticks(pid) if self._procfs else None
        if started is not None:  # Linux: the start time straight from /proc/PID/stat, a third of psutil's cost
            key: tuple[int, float] = (pid, started)
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached.found_by(source)
        try:
            proc = psutil.Process(pid)
            if started is None:
                key = (pid, proc.create_time())
        except psutil.NoSuchProcess:
            return Attribution(ProcessInfo(pid=pid, extra={"state": "exited"}), pid_source=source)
        except psutil.Error as exc:
            return Attribution(ProcessInfo(pid=pid, extra={"state": f"inaccessible: {type(exc).__name__}"}),
                               pid_source=source)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached.found_by(source)
        entry = _Cached(self._describe_process(proc))
        with self._lock:
            entry = self._cache.setdefault(key, entry)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return entry.found_by(source)

    def _describe_process(self, proc: psutil.Process) -> Attribution:
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
            cmdline=_cmdline_text(cmdline, CMDLINE_LIMIT), cmdline_args=_args_unless_plain(cmdline),
            cwd=info.get("cwd") or None,
            start_time=format_ts(datetime.fromtimestamp(info["create_time"], UTC)) if info.get("create_time")
            else None,
            # The parent in full (with its command line); the chain by pid, exe and name only, as the schema's
            # ancestors are (the parent's command line is not repeated there).
            parent=ancestors[0] if ancestors else None,
            ancestors=[attrs.evolve(a, cmdline=None) for a in ancestors] or None,
        )
        uids = info.get("uids")
        gids = info.get("gids")
        actor = Actor(uid=getattr(uids, "real", None), gid=getattr(gids, "real", None),
                      user=info.get("username") or None, terminal=info.get("terminal") or None,
                      is_elevated=getattr(uids, "effective", None) == 0 if uids is not None else None)
        return Attribution(process, actor, self.apps.for_process(process, ancestors))


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


def _args_unless_plain(args: list[str] | None) -> list[str] | None:
    """The argument list, where the command line does not already say it: when an argument is empty or holds
    whitespace (``sh -c "a b"``), joining loses where arguments begin; otherwise ``cmdline`` says it all."""
    if not args or len(" ".join(args)) > CMDLINE_LIMIT:
        return None
    if all(arg and not any(c.isspace() for c in arg) for arg in args):
        return None
    return list(args)


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
