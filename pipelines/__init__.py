"""Job entrypoints: ``python -m pipelines.<stage> CONFIG.yaml [key=value ...]`` (what `ray job submit` runs)."""
