"""The agent's end of its link to the node proxy: one request at a time, each waiting for its ack."""

from __future__ import annotations

import asyncio
import logging
import socket

from ztunnel.errors import ZtunnelError
from ztunnel.inpod import protocol
from ztunnel.inpod.channel import Channel
from ztunnel.inpod.session import AgentSession

log = logging.getLogger("ztunnel.redirect.agent")

ACK_TIMEOUT = 10.0  # the proxy creates three listeners per pod; seconds, not minutes


class AgentError(ZtunnelError):
    """An event the agent could not complete; `status`/`code` map to HTTP and the CNI error code.

    CNI codes: 11 "try again later" while the agent cannot act yet (no proxy connected, the proxy did not
    answer, the pod not in the config yet); 100 "enrollment failed" when the proxy refused the pod or the
    rules could not be installed; 3/4 for a bad request. Either way nothing of ours stays in the pod.
    """

    def __init__(self, msg: str, *, status: int = 503, code: int = 11, details: str = "") -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.details = details


class ProxyLink:
    """The connected proxy (at most one)."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.session = AgentSession()

    @property
    def connected(self) -> bool:
        """True while a proxy is connected; notices a proxy that went away since the last message."""
        channel = self.channel
        if channel is None:
            return False
        try:
            alive = channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive = True  # nothing pending: still connected
        except OSError:
            alive = False
        if not alive:
            self.drop(channel)
        return alive

    async def call(self, msg: protocol.AddWorkload | protocol.DelWorkload | protocol.SnapshotSent) -> None:
        """Send and wait for the ack; raises AgentError (and drops the link) on nack, timeout or EOF."""
        channel = self.channel
        if channel is None:
            raise AgentError("the node proxy is not connected to the node agent")
        try:
            await channel.send(msg)
            async with asyncio.timeout(ACK_TIMEOUT):
                reply = await channel.recv()
        except (TimeoutError, OSError, protocol.ProtocolError) as e:
            self.drop(channel)
            raise AgentError(f"the node proxy did not answer: {e or type(e).__name__}") from e
        check = self.session.check_ack(msg, reply)
        if check.refused:  # the proxy is there and said no: enrollment failed (not "try again later")
            raise AgentError(f"the node proxy refused: {check.error}", status=500, code=100)
        if not check.ok:
            self.drop(channel)
            raise AgentError(check.error)

    def drop(self, channel: Channel) -> None:
        if self.channel is channel:
            self.channel = None
            log.warning("node proxy disconnected")
        channel.close()
