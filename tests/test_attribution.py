"""Process attribution with real processes and real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from oisp.attribution import Attributor


def test_the_client_process_of_a_loopback_connection_is_named(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    script = tmp_path / "agent.py"
    script.write_text(
        "import socket, sys\n"
        f"s = socket.create_connection(('127.0.0.1', {port}))\n"
        "sys.stdout.write('connected\\n'); sys.stdout.flush()\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, str(script), "--task", "fix"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=tmp_path, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "connected\n"
        conn, client_addr = server.accept()
        with conn:
            attribution = Attributor()(client_addr, ("127.0.0.1", port), None)
            assert attribution is not None
            process = attribution.process
            assert process.pid == child.pid
            assert process.ppid == os.getpid()
            assert process.exe == psutil.Process(child.pid).exe()
            assert process.cmdline_args == [sys.executable, str(script), "--task", "fix"]
            assert process.cwd == str(tmp_path)
            assert process.parent is not None and process.parent.pid == os.getpid()
            assert process.ancestors and process.ancestors[0].pid == os.getpid()
            assert process.start_time and process.start_time.endswith("Z")
            assert attribution.actor is not None and attribution.actor.uid == os.getuid()
    finally:
        child.communicate("")
        server.close()


def test_descriptions_are_cached_by_pid_and_create_time() -> None:
    attributor = Attributor()
    first = attributor.describe(os.getpid())
    assert attributor.describe(os.getpid()) is first


def test_an_exited_process_is_reported_as_exited_not_guessed() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    attribution = Attributor().describe(child.pid)
    assert attribution.process.pid == child.pid
    assert attribution.process.extra == {"state": "exited"}
    assert attribution.process.exe is None


def test_a_connection_not_on_this_machine_has_no_process() -> None:
    assert Attributor(connections=lambda: [])(("10.9.9.9", 1), ("127.0.0.1", 2), None) is None


@pytest.mark.skipif(sys.platform != "linux", reason="the app registry test uses a renamed copy of python")
def test_the_known_app_at_the_top_of_the_parent_chain_is_identified(tmp_path: Path) -> None:
    fake_ide = tmp_path / "cursor"
    fake_ide.symlink_to(sys.executable)
    # "cursor" starts a python agent; the agent's process is described, the app is the IDE above it.
    code = "import subprocess, sys; p = subprocess.Popen([sys.argv[1], '-c', 'import sys; sys.stdin.read()'], " \
           "stdin=subprocess.PIPE); print(p.pid, flush=True); sys.stdin.read(); p.communicate(b'')"
    ide = subprocess.Popen([str(fake_ide), "-c", code, sys.executable], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert ide.stdout is not None
        agent_pid = int(ide.stdout.readline())
        attribution = Attributor().describe(agent_pid)
        assert attribution.process.ppid == ide.pid
        assert attribution.app is not None and attribution.app.app_id == "cursor"
    finally:
        ide.communicate("")


@pytest.mark.skipif(sys.platform != "linux", reason="sock_diag and /proc/net are Linux")
@pytest.mark.parametrize("family", ["ipv4", "ipv6", "ipv4-mapped"])
def test_the_kernels_socket_lookup_finds_the_same_socket_as_proc_net(family: str) -> None:
    from oisp.attribution import _diag_inode, _socket_inode

    if family == "ipv4":
        server = socket.create_server(("127.0.0.1", 0))
    elif family == "ipv6":
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    else:  # a dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1
        server = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = server.getsockname()[1]
    with server, socket.create_connection(("::1" if family == "ipv6" else "127.0.0.1", port)) as client:
        conn, client_addr = server.accept()
        with conn:
            peer, local = (str(client_addr[0]), int(client_addr[1])), (str(conn.getsockname()[0]), port)
            inode = _diag_inode(peer, local)
            assert inode is not None
            assert inode == _socket_inode(peer, local) == os.stat(client.fileno()).st_ino
            assert Attributor()(peer, local, None).process.pid == os.getpid()  # type: ignore[union-attr]
    assert _diag_inode(peer, local) is None  # closed: no such socket any more


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/net is Linux")
def test_without_sock_diag_the_socket_is_found_through_proc_net(monkeypatch: pytest.MonkeyPatch) -> None:
    import oisp.attribution as attribution_module

    def unavailable(client: tuple[str, int], local: tuple[str, int]) -> int | None:
        raise PermissionError(13, "netlink refused")

    monkeypatch.setattr(attribution_module, "_diag_inode", unavailable)
    attributor = Attributor()
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        conn, client_addr = server.accept()
        with conn:
            found = attributor(client_addr, server.getsockname(), None)
    assert found is not None and found.process.pid == os.getpid()
    assert attributor._netlink is False  # asked once, then /proc/net/tcp only
