"""The frame channel's sending side: a sender that waits for the buffer to drain is woken however many wait."""

from __future__ import annotations

import socket

import anyio
import pytest

from oisp.decoder_process.channel import FrameChannel
from oisp.decoder_process.wire import FrameReader, Kind

pytestmark = pytest.mark.anyio
_wait_readable = getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_every_sender_waiting_for_room_is_woken_once_the_reader_catches_up() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = FrameChannel(ours)
        payload = b"x" * 65536
        woken: list[int] = []

        async def wait(number: int) -> None:
            await channel.wait_buffered_below(1024 * 1024)
            woken.append(number)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(channel.run_writer)
            with anyio.fail_after(30):
                while channel.buffered <= 4 * 1024 * 1024:  # the kernel's buffer is full, then ours holds 4 MiB
                    channel.send(Kind.CLIENT_DATA, 1, payload, force=True)
                    await anyio.sleep(0)
                for number in range(3):  # three shards' readers waiting for the same channel
                    tasks.start_soon(wait, number)
                await anyio.sleep(0)
                assert woken == []
                theirs.setblocking(False)
                reader = FrameReader()
                while len(woken) < 3:  # the other end reads everything: each waiter comes back
                    await _wait_readable(theirs)
                    try:
                        reader.feed(theirs.recv(1 << 20))
                    except BlockingIOError:
                        continue
            assert sorted(woken) == [0, 1, 2]
            tasks.cancel_scope.cancel()
