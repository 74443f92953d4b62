"""L4 authorization (Istio AuthorizationPolicy semantics): the policy model, its compiler
to per-identity verdicts, and the kernel part that enforces them."""
