import argparse

from workflow.cli import arrow_without_pandas, exit_leaving_objects
from workflow.rg4.build import main

# the rules rewriter hands pyarrow Arrow tables and Python values only; the llm rewriter's request tables
# go through workflow.llm's pandas frames, so pyarrow must keep recognising them there
_rewriter = argparse.ArgumentParser(add_help=False)
_rewriter.add_argument("--rewriter", default="rules")
if _rewriter.parse_known_args()[0].rewriter == "rules":
    arrow_without_pandas()
main()
# the shard's caches (every sentence's labels, edits and rephrasings) are not freed one by one
exit_leaving_objects()
