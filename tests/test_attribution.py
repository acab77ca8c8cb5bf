"""Process attribution with real processes and real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from tests.netns import poll_until

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
            # plain arguments: the command line says it all, the list is not repeated
            assert process.cmdline == " ".join([sys.executable, str(script), "--task", "fix"])
            assert process.cmdline_args is None
            assert process.cwd == str(tmp_path)
            assert process.parent is not None and process.parent.pid == os.getpid()
            assert process.parent.cmdline  # the parent in full ...
            assert process.ancestors and process.ancestors[0].pid == os.getpid()
            assert process.ancestors[0].cmdline is None  # ... and not repeated in the chain
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


_CONNECTED_CHILD = (
    "import json, socket, sys\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
    "print(json.dumps({'local': s.getsockname()[:2], 'remote': s.getpeername()[:2], 'fd': s.fileno()}),"
    " flush=True)\n"
    "sys.stdin.read()\n"
)


def _address(item: list[object]) -> tuple[str, int]:
    return str(item[0]), int(str(item[1]))


def _rewritten(client: tuple[str, int], original: tuple[str, int]) -> tuple[tuple[str, int], tuple[str, int]]:
    """The (peer, local) addresses the proxy sees for a connection the interceptor's NAT diverted: the original
    destination's address with the client's port, and the client's address with the proxy's port."""
    return (original[0], client[1]), (client[0], 1)


@pytest.mark.skipif(sys.platform != "linux", reason="socket lookups through /proc are Linux")
@pytest.mark.parametrize("lookup", ["sock_diag", "proc_net"])
def test_a_diverted_clients_socket_is_found_by_its_original_tuple(lookup: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import oisp.attribution as attribution_module
    from oisp.attribution import ClientSocket, PidSource

    if lookup == "proc_net":
        def unavailable(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
            raise PermissionError(13, "netlink refused")

        monkeypatch.setattr(attribution_module, "_diag_inode", unavailable)
    with socket.create_server(("127.0.0.1", 0)) as server:
        child = subprocess.Popen([sys.executable, "-c", _CONNECTED_CHILD, "127.0.0.1", str(server.getsockname()[1])],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            made = json.loads(child.stdout.readline())
            own, original = _address(made["local"]), _address(made["remote"])
            peer, local = _rewritten(own, original)
            attributor = Attributor()
            assert attributor(peer, local, None) is None  # by what the proxy sees: nothing, the NAT rewrote it
            found = attributor(peer, local, None, original=ClientSocket(own, original))
            assert found is not None and found.process.pid == child.pid
            assert found.process.exe == psutil.Process(child.pid).exe()
            expected = PidSource.SOCK_DIAG_ORIGINAL if lookup == "sock_diag" else PidSource.PROC_NET_ORIGINAL
            assert found.pid_source is expected
            assert found.actor is not None and found.actor.uid == os.getuid()
            # A pid from the interceptor wins, and says so; a plain description says nothing of a lookup.
            hinted = attributor(peer, local, child.pid, original=ClientSocket(own, original))
            assert hinted is not None and hinted.pid_source is PidSource.FLOW_LAYER
            assert hinted.process == found.process
            assert attributor.describe(child.pid).pid_source is None
            if lookup == "sock_diag":  # the client seen before is recalled on the event loop, same answer
                assert attributor.recall(peer, local, None,
                                         original=ClientSocket(own, original)) is found
        finally:
            child.communicate("")


def test_a_namespace_file_that_names_another_namespace_is_refused() -> None:
    from oisp.netns import NetworkNamespace, run_inside

    if not os.path.exists("/proc/self/ns/net"):
        pytest.skip("no network namespace files here (Linux only)")
    stale = NetworkNamespace("/proc/self/ns/net", (0, 0))  # not the identity that file has
    with pytest.raises(OSError, match="no longer names"):
        run_inside(stale, lambda: None)


@pytest.mark.root
def test_a_client_in_another_network_namespace_is_found_there() -> None:
    import json
    import shutil

    from oisp.attribution import ClientSocket, PidSource
    from oisp.netns import NetworkNamespace, current_identity
    from oisp.sockdiag import NamespaceSockDiag, diag_inode

    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs Linux, root and unshare(1) to make a network namespace")
    # A new network namespace with only its own loopback: a server and a client connected to it, in there.
    inside = ("import socket, subprocess, sys\n"
              "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
              "server = socket.create_server(('127.0.0.1', 0))\n"
              "sys.argv[1:] = ['127.0.0.1', str(server.getsockname()[1])]\n" + _CONNECTED_CHILD)
    child = subprocess.Popen(["unshare", "--net", "--", sys.executable, "-c", inside], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        made = json.loads(child.stdout.readline())
        own, original = _address(made["local"]), _address(made["remote"])
        stat = os.stat(f"/proc/{child.pid}/ns/net")
        namespace = NetworkNamespace(f"/proc/{child.pid}/ns/net", (stat.st_dev, stat.st_ino))
        before = current_identity()
        assert namespace.identity != before
        assert diag_inode(own, original) is None  # not a socket of this namespace
        diag = NamespaceSockDiag(namespace)
        try:
            socket_inode = os.stat(f"/proc/{child.pid}/fd/{made['fd']}").st_ino
            assert diag.inode(own, original) == socket_inode
        finally:
            diag.close()
        peer, local = _rewritten(own, original)
        found = Attributor()(peer, local, None,
                             original=ClientSocket(own, original, namespace))
        assert found is not None and found.process.pid == child.pid
        assert found.pid_source is PidSource.SOCK_DIAG_ORIGINAL
        assert current_identity() == before  # no thread of this process but the short-lived one changed namespace
    finally:
        child.communicate("")


def test_arguments_the_command_line_cannot_say_are_kept_as_a_list(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "two words", ""],
                             stdin=subprocess.PIPE, text=True)
    try:
        process = poll_until(lambda: Attributor().describe(child.pid).process if psutil.Process(child.pid).cmdline()
                             [-2:] == ["two words", ""] else None, timeout=10, what="the child's command line")
        assert process.cmdline_args == [sys.executable, "-c", "import sys; sys.stdin.read()", "two words", ""]
    finally:
        child.communicate("")
