"""Authorization (Istio AuthorizationPolicy semantics), peer authentication, legacy RBAC conversion.

Module map (sans-IO throughout: objects in, decisions out):
- `engine`    PolicyEngine.from_config(config[, previous]) -> check_l4 / check_l7 / peer_authentication_mode;
              ConnectionAttributes, HttpRequestAttributes, Decision. The one engine for proxy, waypoint and CLI.
- `authz`     AuthorizationPolicy validation and compilation into matchers (the L4 reduction lives here).
- `peerauth`  PeerAuthentication (mTLS modes, port-level) and RequestAuthentication (parsed for the waypoint).
- `legacy`    rbac.istio.io ServiceRole/ServiceRoleBinding/ClusterRbacConfig and authentication.istio.io
              Policy/MeshPolicy converted to current objects (what cannot be converted exactly is listed there).
- `matchers`  exact/prefix/suffix/presence strings, CIDRs, ports.
- `commands`  `ztunnel convert`, `ztunnel authz check|validate`.
"""
