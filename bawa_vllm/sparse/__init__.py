"""The 2:4-packed checkpoint format (docs/FORMAT.md) and converters; no vLLM imports."""
