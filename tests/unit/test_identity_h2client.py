"""The grpcio-free CA client's hand-made protobuf matches the generated messages byte for byte."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from ztunnel.identity.authz import IMPERSONATED_IDENTITY
from ztunnel.identity.h2client import (
    decode_response,
    decode_revocation_response,
    encode_request,
    encode_revocation_request,
)
from ztunnel.identity.proto import ca_pb2, revocation_pb2
from ztunnel.identity.revocation import RevocationAnswer, SignedRevocationList


@pytest.mark.parametrize("impersonated", ["", "spiffe://cluster.local/ns/shop/sa/web"])
@pytest.mark.parametrize("validity", [1, 300, 86400, 2**40])
def test_request_encoding_matches_protobuf(impersonated: str, validity: int) -> None:
    csr = "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 300 + "\n-----END CERTIFICATE REQUEST-----\n"
    want = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity)
    if impersonated:
        want.metadata.CopyFrom(struct_pb2.Struct())
        want.metadata.fields[IMPERSONATED_IDENTITY].string_value = impersonated
    ours = encode_request(csr, validity, impersonated)
    assert ours == want.SerializeToString()
    parsed = ca_pb2.IstioCertificateRequest.FromString(ours)
    assert parsed.csr == csr and parsed.validity_duration == validity


def test_response_decoding_matches_protobuf() -> None:
    chain = ["leaf-pem\n" * 40, "intermediate", "root é"]
    assert decode_response(ca_pb2.IstioCertificateResponse(cert_chain=chain).SerializeToString()) == chain
    assert decode_response(b"") == []


@pytest.mark.parametrize("garbage", [b"\x0a\x05abc", b"\x0a", b"\x80", b"\x0f"])
def test_truncated_or_odd_responses_raise_value_error(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        decode_response(garbage)


@pytest.mark.parametrize("known", [0, 1, 300, 2**63])
def test_revocation_request_encoding_matches_protobuf(known: int) -> None:
    want = revocation_pb2.RevocationListRequest(known_number=known).SerializeToString()
    assert encode_revocation_request(known) == want


@pytest.mark.parametrize("crl", [b"", b"\x30\x82\x01\x00" + bytes(range(256))])
def test_revocation_response_decoding_matches_protobuf(crl: bytes) -> None:
    chain = ["intermediate-pem\n" * 20, "root"]
    wire = revocation_pb2.RevocationListResponse(crl=crl, number=7, issuer_chain=chain).SerializeToString()
    got = decode_revocation_response(wire)
    assert got.crl == crl and got.number == 7 and got.issuer_chain == tuple(c.encode() for c in chain)
    assert got.retired == ()
    assert decode_revocation_response(b"") == RevocationAnswer(b"", 0, ())
    retired = [revocation_pb2.SignedRevocationList(crl=b"old" + crl, issuer_chain=["old-int", "root"])] * 2
    with_retired = revocation_pb2.RevocationListResponse(crl=crl, number=7, retired=retired).SerializeToString()
    assert decode_revocation_response(with_retired).retired == (
        SignedRevocationList(b"old" + crl, (b"old-int", b"root")),
    ) * 2
    with pytest.raises(ValueError):
        decode_revocation_response(wire[:-3])
