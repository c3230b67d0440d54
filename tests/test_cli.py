"""Command-line plumbing shared by the workflow's job entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a job process: told first, then it converts Python values (no pandas import), and an explicit
# to_pandas still gives a DataFrame
JOB = """
import sys
from workflow.cli import arrow_without_pandas
arrow_without_pandas()
import pyarrow as pa, pyarrow.compute as pc
t = pa.table({"name": ["effusion", None], "n": [1, 2]})
assert pc.equal(t["name"], "effusion").to_pylist() == [True, None]
assert "pandas" not in sys.modules
assert t.to_pandas()["n"].tolist() == [1, 2]
print("ok")
"""


def test_a_job_told_arrow_has_no_pandas_converts_values_without_it_and_still_reads_into_pandas():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", JOB], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
