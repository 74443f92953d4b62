"""The kernel layer: bpf(2), map layouts from BTF, attach/detach, and the loader (the one
place bcc compiles). Everything above it works on pinned objects through these modules."""
