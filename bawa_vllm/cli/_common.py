"""What the console scripts share: logging setup and turning expected errors into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, KeyError, ImportError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run ``fn``; an expected error becomes ``error: ...`` on stderr and exit status 2."""
    try:
        return fn() or 0
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
