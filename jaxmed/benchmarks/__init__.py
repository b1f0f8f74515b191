"""Benchmarks of jaxmed, one module per family; run them with `python -m jaxmed.benchmark`."""
