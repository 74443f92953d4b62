"""Generated from proto/accel/agent/v1/agent.proto by scripts/gen-proto.sh: do not edit."""
