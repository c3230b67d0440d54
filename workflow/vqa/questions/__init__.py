"""Question builders, one module per type. Each reads the prepared inputs without changing them and
returns a question frame (:mod:`workflow.vqa.questions.frame`)."""
