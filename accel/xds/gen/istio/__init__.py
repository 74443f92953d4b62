"""Generated from proto/accel/istio/ by scripts/gen-proto.sh: do not edit."""
