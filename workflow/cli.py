"""Shared command-line plumbing for the ``python -m workflow.<step>`` entry points the rules call."""

from __future__ import annotations

import argparse
import logging
import sys


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (the rule's ``log:`` file); never log report text."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p
