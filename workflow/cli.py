"""Shared command-line plumbing for the ``python -m workflow.<step>`` entry points the rules call."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (the rule's ``log:`` file); never log report text."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def exit_leaving_objects() -> NoReturn:
    """End the process once a job's outputs are written and closed, without freeing its objects one by
    one: the teardown returns nothing to the OS that the exit does not, and costs CPU where a job holds
    many (the RaDialog export's ~640k encoded records and 257k images at 227,835 studies: ~0.7 s). The
    log and stdio are flushed first. Only a job's ``__main__`` calls it (tests call ``main`` and go on)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


class _PandasKeptOut:
    """A meta path finder that fails every import of pandas (see :func:`arrow_without_pandas`)."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("pandas is kept out of this job's pyarrow", name=name)
        return None


def arrow_without_pandas() -> None:
    """Tell pyarrow that pandas is absent, for a job process that never gives pyarrow a pandas object.

    pyarrow imports pandas the first time it converts any Python or NumPy value (a list, a scalar in a
    compute call), only to ask whether the value is a pandas object: ~0.35 s CPU of a job whose own work
    may take less. pyarrow tries that import once and remembers a failure, so it is made to fail once;
    an explicit ``to_pandas`` / ``from_pandas`` later still imports pandas. Call it from the job's
    ``__main__`` block only: in a process that later converts pandas objects with ``pa.array`` (tests,
    notebooks) they would be read as plain sequences."""
    global pandas_kept_out
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    sys.meta_path.insert(0, _PandasKeptOut)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_PandasKeptOut)
    pandas_kept_out = True


# whether this process called arrow_without_pandas (its forked workers inherit what pyarrow remembers)
pandas_kept_out = False
