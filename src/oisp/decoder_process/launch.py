"""Starting the decoder process with one end of a socket pair: the platform-specific part.

POSIX passes the socket as an inherited file descriptor; Windows (untested here) shares it through the
child's standard input with ``socket.share``. The child runs ``python -m oisp.decoder_process`` with the
proxy's interpreter, so no ``multiprocessing`` bootstrapping re-imports the caller's main module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

__all__ = ["socket_from_handle", "spawn_worker"]


def spawn_worker(sock: socket.socket) -> subprocess.Popen[bytes]:
    """Start the decoder process, connected through ``sock`` (the caller closes its copy afterwards)."""
    env = dict(os.environ)
    root = _import_root()
    if root is not None:  # oisp imported from a source tree, not an installation: the child must find it too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "oisp.decoder_process"]
    if sys.platform == "win32":  # pragma: no cover - Windows (a check mypy evaluates: its win32 pass checks this)
        process = subprocess.Popen([*command, "--shared"], stdin=subprocess.PIPE, env=env)
        assert process.stdin is not None
        process.stdin.write(sock.share(process.pid))
        process.stdin.close()
        return process
    return subprocess.Popen([*command, "--fd", str(sock.fileno())], pass_fds=(sock.fileno(),), env=env,
                            stdin=subprocess.DEVNULL)


def socket_from_handle(fd: int | None, shared: bool) -> socket.socket:
    """The decoder process's end of the socket pair, as :func:`spawn_worker` handed it over."""
    if shared:  # pragma: no cover - Windows
        if sys.platform != "win32":
            raise ValueError("--shared is for Windows; use --fd")
        return socket.fromshare(sys.stdin.buffer.read())
    if fd is None:
        raise ValueError("--fd or --shared is required")
    return socket.socket(fileno=fd)


def _import_root() -> str | None:
    """The directory oisp was imported from, unless that is an installation's site-packages."""
    import oisp

    root = os.path.dirname(os.path.dirname(os.path.abspath(oisp.__file__)))
    if os.path.basename(root) in ("site-packages", "dist-packages"):
        return None
    return root
