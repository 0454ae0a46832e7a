"""The performance benchmark of the segments service: `make bench` (see BENCHMARKS.md)."""
