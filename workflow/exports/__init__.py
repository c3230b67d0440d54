"""Training files of the other seeds: R2GenGPT/MeGPT ``annotation.json`` (:mod:`.r2gen`, with the R2Gen
cleaners in :mod:`.cleaners`) and RaDialog RG/INS (:mod:`.radialog`). ``python -m workflow.exports``
runs the rule (:mod:`.build`)."""

# What the R2Gen annotation's ``report`` can hold, and each corpus's reference annotation's choice
# (R2GenGPT's MIMIC file / R2Gen's IU X-Ray file): here, so the card's job imports no table library.
SECTION_CHOICES = ("findings", "findings_impression")
DEFAULT_SECTIONS = {"mimic": "findings_impression", "iu": "findings"}
