"""Authorization (Istio AuthorizationPolicy semantics), peer authentication, legacy RBAC conversion.

Module map, bottom up (sans-IO throughout: objects in, decisions out; each imports only those above it):
- `matchers`    exact/prefix/suffix/presence strings, CIDRs, ports; the matchers of one request attribute.
- `model`       the validated objects: AuthorizationPolicy (rules of `Check`s), PeerAuthentication,
                RequestAuthentication, RejectedPolicy; PolicyError; L4/L7.
- `validation`  ObjectReader (shapes, known fields, errors naming file/object/field), selector, dry-run.
- `authz`       AuthorizationPolicy spec -> model (value lists compiled into matchers).
- `peerauth`    PeerAuthentication and RequestAuthentication spec -> model.
- `legacy/`     rbac.istio.io and authentication.istio.io objects converted to current ones (rbac, authn, emit).
- `load`        every security object of a snapshot read (legacy converted first, unchanged ones reused).
- `decision`    ConnectionAttributes, HttpRequestAttributes in; Decision out.
- `compile`     the policies selecting one workload compiled for one layer (the L4 reduction lives here).
- `evaluation`  decisions over compiled policies; which PeerAuthentication applies.
- `engine`      PolicyEngine.from_config(config[, previous]) -> check_l4 / check_l7 / peer_authentication_mode:
                the one engine for proxy, waypoint and CLI (selection index and per-workload cache).
- `commands`    `ztunnel convert`, `ztunnel authz check|validate`.
"""
