"""SPIFFE workload identities, the CA that signs them, and the node proxy's certificate manager.

Modules, from the bottom up:
- `spiffe`: `SpiffeId` (spiffe://<td>/ns/<ns>/sa/<sa>).
- `certs`: keys, CSRs, `WorkloadCertificate` (key in memory only) and the `CertificateProvider` protocol.
- `ca`: the CA directory (`init_ca_dir`, `CertificateAuthority.load/sign_csr/issue/revoke`), SVID fields.
- `authz`: node authorization, sans-IO (token -> node, node -> identities of its pods).
- `server` (grpcio, stubs in `proto/`) and `h2client` (the proxy's grpcio-free caller):
  Istio's `IstioCertificateService/CreateCertificate` over TLS.
- `manager`: `CertificateManager.in_process(...)` / `.remote(...)`: per-identity certs, rotation, backoff.
- `tls`: TLS 1.3 mTLS contexts from a `WorkloadCertificate` (with CRL checking when it carries one).
- `commands`: `ztunnel ca init|issue|serve|revoke`.
"""
