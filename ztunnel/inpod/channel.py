"""The socket edge of the agent <-> proxy protocol: whole datagrams, with their fds, in and out."""

from __future__ import annotations

import asyncio
import os
import socket

from ztunnel.inpod.protocol import MAX_DATAGRAM, Message, ProtocolError, decode, encode


def send(sock: socket.socket, msg: Message) -> None:
    data, fds = encode(msg)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv(sock: socket.socket) -> Message | None:
    """One message, or None at EOF. Raises ProtocolError for a bad datagram."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_DATAGRAM, 4)
    if not data and not fds:
        return None
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("control data truncated (too many fds)")
    return decode(data, fds)


class Channel:
    """An asyncio edge over a connected SOCK_SEQPACKET socket: whole messages in and out."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()
        add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(fd, ready)
        try:
            await fut
        finally:
            remove(fd)

    async def recv(self) -> Message | None:
        while True:
            try:
                return recv(self.sock)
            except BlockingIOError:
                await self._wait(writable=False)
            except (ConnectionResetError, BrokenPipeError):
                return None

    async def send(self, msg: Message) -> None:
        while True:
            try:
                send(self.sock, msg)
                return
            except BlockingIOError:
                await self._wait(writable=True)

    def close(self) -> None:
        self.sock.close()
