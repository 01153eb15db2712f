"""Benchmark harnesses behind `python -m jobs.benchmark train|serve`: cases, load generation, figures, plots.

Jobs and benchmarks sit above the library: `llmopt` never imports them (an import-linter contract).
"""
