"""The datapath parts a table is applied to: socket maps (datapath, services, maps), the
XDP edge (edge/) and pod routing (podroute), over the kernel layer (accel/kernel)."""
