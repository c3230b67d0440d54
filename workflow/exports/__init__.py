"""Training files of the other seeds: R2GenGPT/MeGPT ``annotation.json`` (:mod:`.r2gen`, with the R2Gen
cleaners in :mod:`.cleaners`) and RaDialog RG/INS (:mod:`.radialog`). ``python -m workflow.exports``
runs the rule (:mod:`.build`)."""
