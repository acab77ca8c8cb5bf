"""sock_diag lookups (Linux): the listener check the interceptor makes from its packet thread."""

from __future__ import annotations

import socket
import sys

import pytest

from oisp.sockdiag import tcp_listening

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux-only")


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_listener_is_found_and_a_closed_one_is_not(family: int, host: str) -> None:
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert tcp_listening(port)
    assert not tcp_listening(port)


def test_a_connected_socket_is_no_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert not tcp_listening(client.getsockname()[1])
                assert tcp_listening(listener.getsockname()[1])
