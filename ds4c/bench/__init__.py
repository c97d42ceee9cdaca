"""Benchmarks users run from the CLI (``ds4c bench ...``): workloads, drivers and their reports."""
