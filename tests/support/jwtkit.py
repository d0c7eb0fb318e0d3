"""Test issuers for the waypoint's JWT checks: a key of every accepted algorithm, its JWKS, and tokens.

Keys are generated per test session with `cryptography` (nothing checked in); tokens are minted with PyJWT,
except the ones no library would mint (alg `none`, HMAC keyed with a public key), which are built by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

NOW = 1_700_000_000.0  # the wall clock of these tests


@dataclass(frozen=True)
class TestKey:
    alg: str
    kid: str
    private: Any

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def jwk(self, **extra: Any) -> dict[str, Any]:
        pub = self.public
        if isinstance(pub, rsa.RSAPublicKey):
            d = RSAAlgorithm.to_jwk(pub, as_dict=True)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            d = ECAlgorithm.to_jwk(pub, as_dict=True)
        else:
            d = OKPAlgorithm.to_jwk(pub, as_dict=True)
        return {**d, "kid": self.kid, "use": "sig", **extra}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header})

    def public_pem(self) -> bytes:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        pem: bytes = self.public.public_bytes(serialization.Encoding.PEM, spki)
        return pem


@cache
def _rsa(n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@cache
def key(alg: str, kid: str | None = None, n: int = 0) -> TestKey:
    """The session's key for `alg` (`n` picks another key of the same kind)."""
    if alg.startswith(("RS", "PS")):
        private: Any = _rsa(n)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(alg)
    return TestKey(alg, kid or f"{alg.lower()}-{n}", private)


ALL_ALGS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")


def jwks(*keys: TestKey) -> str:
    return json.dumps({"keys": [k.jwk() for k in keys]})


def claims(iss: str = "https://issuer.test", sub: str = "alice", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": iss, "sub": sub, "iat": int(NOW) - 10, "exp": int(NOW) + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def hmac_with_public_key(k: TestKey, payload: dict[str, Any]) -> str:
    """The algorithm-confusion attack: HS256 keyed with the issuer's (public) PEM."""
    head = b64(json.dumps({"alg": "HS256", "kid": k.kid, "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(k.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"
