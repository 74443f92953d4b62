"""The agent's gRPC API (server, client, message conversion) and its Prometheus metrics."""
