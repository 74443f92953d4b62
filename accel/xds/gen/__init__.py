"""Generated code for the xDS resource types xds-protos lacks (scripts/gen-proto.sh)."""
