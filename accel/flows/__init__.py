"""Connection records: the kernel's flow events (accel/bpf/lib/flows.h) read from their ring
(record.py decodes, reader.py polls), kept, logged and counted per service (store.py,
log.py, metrics in accel/api/metrics.py)."""
