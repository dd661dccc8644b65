"""Pruning: metrics (scores per weight), masks (patterns), the Θ search, methods and the block driver."""

from .masks import SparsityPattern, apply_mask_, keep_mask
from .metrics import BawaNorms, bawa_scores, magnitude_scores, wanda_scores

__all__ = ["SparsityPattern", "keep_mask", "apply_mask_", "BawaNorms", "bawa_scores", "magnitude_scores",
           "wanda_scores"]
