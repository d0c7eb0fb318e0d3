"""Authorization (Istio AuthorizationPolicy semantics), peer authentication, legacy RBAC conversion."""
