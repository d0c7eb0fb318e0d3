"""The CA wire API keeps Istio's names and field numbers, and the committed stubs match the .proto."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from ztunnel.identity.proto import ca_pb2, ca_pb2_grpc

PROTO_DIR = Path(ca_pb2.__file__).parent
REPO = PROTO_DIR.parents[2]


def test_istio_names_and_field_numbers() -> None:
    service = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    method = service.methods_by_name["CreateCertificate"]
    assert method.input_type.full_name == "istio.v1.auth.IstioCertificateRequest"
    assert method.output_type.full_name == "istio.v1.auth.IstioCertificateResponse"
    req = {f.name: (f.number, f.type) for f in ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields}
    fd = ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields_by_name
    assert req["csr"][0] == 1 and fd["csr"].type == fd["csr"].TYPE_STRING
    assert req["validity_duration"][0] == 2 and fd["validity_duration"].type == fd["csr"].TYPE_INT64
    assert req["metadata"][0] == 3 and fd["metadata"].message_type.full_name == "google.protobuf.Struct"
    chain = ca_pb2.IstioCertificateResponse.DESCRIPTOR.fields_by_name["cert_chain"]
    assert chain.number == 1 and chain.is_repeated
    assert hasattr(ca_pb2_grpc, "IstioCertificateServiceStub")


def test_wire_bytes_are_what_istio_sends() -> None:
    # field 1 (csr) length-delimited, field 2 (validity) varint: 0x0a len 'x' 0x10 varint
    data = ca_pb2.IstioCertificateRequest(csr="x", validity_duration=300).SerializeToString()
    assert data == b"\x0a\x01x\x10\xac\x02"
    assert ca_pb2.IstioCertificateResponse(cert_chain=["a", "b"]).SerializeToString() == b"\x0a\x01a\x0a\x01b"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    proto = "ztunnel/identity/proto/ca.proto"
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        ["protoc", f"-I{REPO}", f"-I{include}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto]
    )
    assert rc == 0
    # Compare the serialized descriptor, not the whole file: a newer grpcio-tools changes only the preamble.
    pattern = re.compile(r"AddSerializedFile\((b'.*?')\)", re.S)
    generated = pattern.search((tmp_path / "ztunnel/identity/proto/ca_pb2.py").read_text())
    committed = pattern.search((PROTO_DIR / "ca_pb2.py").read_text())
    assert generated and committed
    assert generated.group(1) == committed.group(1), "ca_pb2.py is stale: regenerate it (see ca.proto)"
