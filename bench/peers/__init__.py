"""Peer servers the benchmark measures dualcast against (installed by the `bench` extra)."""
