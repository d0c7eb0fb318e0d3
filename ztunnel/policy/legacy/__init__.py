"""Legacy Istio security APIs converted to the current ones, for the engine and for `ztunnel convert`.

Modules: `rbac` (rbac.istio.io), `authn` (authentication.istio.io), `emit` (the result and the Services
read), `convert` (`convert_objects`, the entry point).

`rbac.istio.io/v1alpha1`:
- `ClusterRbacConfig`/`RbacConfig` (`mode` OFF, ON, ON_WITH_INCLUSION, ON_WITH_EXCLUSION; `enforcementMode`)
  becomes "deny unless allowed" scaffolding: ON is a mesh-wide `AuthorizationPolicy` with `spec: {}` in the
  root namespace; ON_WITH_INCLUSION one such policy per included namespace (or per included service, with the
  service's selector); ON_WITH_EXCLUSION the mesh-wide one plus `rules: [{}]` allow-all policies for excluded
  namespaces and services (an ALLOW that matches everything cancels the default deny there, which is exactly
  "RBAC off"). `enforcementMode: PERMISSIVE` becomes the `istio.io/dry-run` annotation.
- `ServiceRole` + `ServiceRoleBinding` become one ALLOW `AuthorizationPolicy` per (binding, target): every
  (subject, access rule) pair is a rule. `services` are mapped to workloads through the `Service` objects of
  the config (their selector); `"*"` covers the namespace. Roles only produce policies where RBAC is enabled,
  since a new-style ALLOW would otherwise switch a workload from allow-all to deny-by-default.
  `methods: ["*"]` and `paths: ["*"]` mean "any" and are dropped, so such rules stay enforceable at L4.
  Binding `mode: PERMISSIVE` becomes dry-run.
`authentication.istio.io/v1alpha1`:
- `MeshPolicy` becomes a `PeerAuthentication` in the root namespace, `Policy` a namespace `PeerAuthentication`
  or, with `targets`, one per target service (selector of the Service; target `ports` become `portLevelMtls`
  on the service's target ports). `peers: [{mtls: {}}]` is STRICT, `mode: PERMISSIVE` PERMISSIVE,
  `peerIsOptional: true` PERMISSIVE, and no `peers` at all DISABLE (peer authentication not required).
- `origins` (JWT) become a `RequestAuthentication` plus a DENY `AuthorizationPolicy` with
  `notRequestPrincipals: ["*"]` (honouring `trigger_rules` paths), unless `originIsOptional` is set.

Not convertible exactly (reported as notes; the conversion always errs towards denying):
- a service in `services`/`targets` that no `Service` in the config defines: nothing is generated for it;
- `constraints` other than `destination.ip`, `destination.port`, `destination.namespace`,
  `destination.labels[...]` (single value) and `request.headers[...]`, and subject `properties` other than
  `source.principal`, `source.namespace`, `source.ip`, `request.auth.*` and `request.headers[...]`: the rule or
  subject is dropped, so it grants nothing;
- `principalBinding: USE_ORIGIN` (the request principal used as the peer principal) has no equivalent;
- JWT settings beyond issuer, audiences, jwksUri, jwks, header and query parameter locations;
- a named target port that no container of the selected pods declares.
"""

from ztunnel.policy.legacy.convert import LEGACY_KINDS, convert_objects
from ztunnel.policy.legacy.emit import CONVERTED_FROM_ANNOTATION, ConversionResult

__all__ = ["CONVERTED_FROM_ANNOTATION", "LEGACY_KINDS", "ConversionResult", "convert_objects"]
