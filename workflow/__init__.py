"""The chest X-ray dataset factory: every step of the workflow as importable, tested Python."""

import os

# Arrow's default allocator (mimalloc, linked into pyarrow) commits its 1 GiB arenas eagerly on Linux, and
# the kernel then faults them in as 2 MB transparent huge pages. Reading one rg4 shard's inputs that way
# took ~290 huge-page faults and 1.5-3.9 s of system time, against ~40 and 0.3 s with commit on first use
# (bench/RESULTS.md, "Whole DAG"). Set here, before any job's first `import pyarrow`, which is when
# mimalloc reads its options; a value in the environment wins.
os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")
