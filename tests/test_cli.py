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


def _jobs_keeping_pandas_out() -> list[str]:
    """The modules a job process imports before its ``__main__`` block calls arrow_without_pandas: each
    module that calls it there, or for a package's ``__main__.py`` the workflow modules it imports."""
    import ast

    modules = []
    for path in sorted((ROOT / "workflow").rglob("*.py")):
        text = path.read_text()
        if path.name == "cli.py" or "arrow_without_pandas()" not in text:
            continue
        if path.name == "__main__.py":
            tree = ast.parse(text)
            modules += [
                node.module
                for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workflow.")
            ]
        else:
            modules.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return sorted(set(modules) - {"workflow.cli"})


def test_job_modules_convert_no_python_values_at_import():
    """A module-level ``pa.array([...])`` in a job's module imports pandas (~0.3 s CPU) before the job's
    ``__main__`` can tell pyarrow that pandas is absent."""
    modules = _jobs_keeping_pandas_out()
    assert {"workflow.sections", "workflow.rg4.build", "workflow.rg4.merge", "workflow.cards"} <= set(modules)
    code = f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pandas')[:1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
