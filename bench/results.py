"""bench/RESULTS.md: each benchmark owns one ``## heading`` section and replaces only that."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, block: str, path: Path = RESULTS) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## ``) by ``block``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + block.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    path.write_text(text if text.endswith("\n") else text + "\n")


def publish(heading: str, block: str, write: bool = True, path: Path = RESULTS) -> None:
    """Print a benchmark's section and, unless ``write`` is off (``--no-write``), put it in RESULTS.md."""
    print(block)
    if write:
        write_section(heading, block, path)
