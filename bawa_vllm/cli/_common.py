"""What the console scripts share: logging setup and turning expected errors into one clear line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, KeyError, ImportError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows every option's default, except for flags and options that have none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def description(doc: str) -> str:
    """A module docstring as ``--help`` text: without reStructuredText's double-backquote literal markup."""
    return doc.replace("``", "")


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
