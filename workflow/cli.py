"""Shared command-line plumbing for the ``python -m workflow.<step>`` entry points the rules call."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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


def add_llm_task_args(p: argparse.ArgumentParser, what: str, max_tokens: int) -> None:
    """The options of a stage that asks the LLM layer for text (rg4's llm rewriter, the exports' language
    tasks): settings, cache, endpoint, where its LLM_REQUESTS rows go, sampling. ``what`` names the task."""
    p.add_argument("--llm-config", help=f"{what}: the LLM settings (a settings file or its JSON)")
    p.add_argument("--llm-cache", type=Path, help=f"{what}: the LLM layer's response cache")
    p.add_argument("--llm-endpoint", default="student", help=f"{what}: the llm.endpoints entry to ask")
    p.add_argument(
        "--llm-requests", type=Path, help=f"LLM_REQUESTS table of {what} (empty when it asks no LLM)"
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
