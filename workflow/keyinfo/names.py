"""Names the key-information jobs share: the sections the rules extractor reads and the device finding.

A module of their own, so that a job needing only these (``keyinfo_studies``) does not import the extractor,
whose import loads the YAML library and compiles its patterns (~40 ms of a 0.5 s job).
"""

READ_SECTIONS = ("findings", "impression")
FALLBACK_SECTION = "last_paragraph"  # read only when a report has neither findings nor impression (MIT-LCP)
DEVICE = "support device"
