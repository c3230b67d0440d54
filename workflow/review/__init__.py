"""The clinicians' review: a seeded, stratified sample of studies rendered as one self-contained offline
HTML page (``build``), and the precision of the datasets computed from the reviewers' verdicts (``score``).

- :mod:`workflow.review.items` turns the finished tables (sections, findings, questions, RG4 records) into
  reviewable items, with evidence spans and rewrite diffs precomputed.
- :mod:`workflow.review.sample` draws the studies (strata: finding presence, question type, RG4 scenario).
- :mod:`workflow.review.build` renders the page (jinja2 template ``page.html.j2``, inline CSS and JS).
- :mod:`workflow.review.score` reads ``verdicts.csv`` files and writes precision with Wilson intervals and
  Cohen's kappa between reviewers.
"""
