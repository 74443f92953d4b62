"""Benchmarks behind `accel bench <name>`: one module per benchmark, each with run() -> dict."""
