"""Benchmarks: each prints ratios of things measured side by side in one run, then one JSON line."""
