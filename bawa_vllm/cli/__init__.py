"""Console entry points: ``bawa-export`` and ``bawa-eval``."""
