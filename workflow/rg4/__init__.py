"""MIMIC-RG4 scenario splits (sn / sw / mn / mw) with input-agnostic rewriting.

``python -m workflow.rg4`` runs the rule (see :mod:`workflow.rg4.build`); the rewriters are in
:mod:`workflow.rg4.rewrite` (rules) and :mod:`workflow.rg4.llm_rewriter` (llm).
"""
