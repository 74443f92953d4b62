"""meshaccel: sidecarless service-mesh acceleration with eBPF."""

__version__ = "0.1.0"
