"""The agent<->proxy message codec (DESIGN §4.7), sans-IO."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.inpod import protocol as p


def test_roundtrip_of_every_message() -> None:
    r, w = os.pipe()
    try:
        for msg in (
            p.Hello(),
            p.KeepWorkload(id=2, uid="u"),
            p.DelWorkload(id=3, uid="u"),
            p.SnapshotSent(id=4),
            p.Ack(id=5, ok=False, error="no"),
        ):
            data, fds = p.encode(msg)
            assert fds == []
            assert p.decode(data, fds) == msg
        add = p.AddWorkload(id=1, uid="ns/pod", workload={"name": "pod", "ips": ["10.0.0.1"]}, netns_fd=r)
        data, fds = p.encode(add)
        assert fds == [r]
        assert p.decode(data, fds) == add
    finally:
        os.close(r)
        os.close(w)


def test_add_without_exactly_one_fd_is_rejected_and_fds_are_closed() -> None:
    data, _ = p.encode(p.AddWorkload(id=1, uid="u", netns_fd=0))
    with pytest.raises(p.ProtocolError, match="exactly one"):
        p.decode(data, [])
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    with pytest.raises(p.ProtocolError):
        p.decode(data, [r1, r2])
    for fd in (r1, r2):
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(w1)
    os.close(w2)


def test_fds_on_a_message_that_carries_none_are_closed() -> None:
    r, w = os.pipe()
    with pytest.raises(p.ProtocolError, match="carries no fds"):
        p.decode(b'{"type":"del","id":1,"uid":"x"}', [r])
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{", b'{"type":"nope"}', b'{"type":"del","id":"1","uid":"x"}', b'{"type":"ack","id":1}'],
)
def test_bad_datagrams_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode(data)


@given(st.binary(max_size=200))
def test_decode_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        p.decode(data)
    except p.ProtocolError:
        pass
