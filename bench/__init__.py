"""Benchmarks of citypulse's hot paths; run each as `python -m bench.<name>` (docs/performance.md)."""
