"""Istio ambient's workload API (istiod -> ztunnel) as a source: Delta ADS of
`istio.workload.Address` (a Workload or a Service) and `istio.security.Authorization`.

- kinds.py: type URLs, resource names, packing under Istio's type URLs
- resources.py: the decoded resources (WorkloadInfo, ServiceInfo)
- decode.py: wire -> resources, validated (AddressProcessor, AuthorizationProcessor)
- state.py: the held resources, changed by a response's upserts and removals
- to_table.py: held state -> ServiceTable (+ what was left and why)
- to_verdicts.py: held state -> Verdicts for this node's workloads
- from_table.py: ServiceTable + policies -> resources, as istiod serves them
- view.py: WorkloadView, one call per response: decode, hold, rebuild (all or nothing)
"""
