"""Ingest: raw report files and their tables → the contract's ``studies``, ``images`` and ``rejects``.

Two corpus formats:

``mimic``
    Reports from the MIMIC-CXR ``files/`` directory **or straight from** ``mimic-cxr-reports.zip`` (never
    unzipped), joined with ``mimic-cxr-2.0.0-split.csv(.gz)`` and ``-metadata.csv(.gz)`` (extra columns are
    ignored). Report files are found the way MIT-LCP's ``create_section_files.py`` finds them: group folders
    ``p`` + 2 characters, patient folders starting with ``p``, study files ``s*.txt``; anything else (READMEs,
    image folders, other files) is ignored. Studies are written sorted by (subject_id, study_id).

    The zip is read from its central directory once and each member is inflated from the raw bytes
    (``zlib``, CRC-32 checked), which is several times faster than ``ZipFile.open`` per member; with
    ``--workers 2`` the members are read and decoded by two processes.

``iu``
    IU X-Ray ``indiana_reports.csv`` + ``indiana_projections.csv``. ``uid`` becomes both ``study_id`` and
    ``subject_id`` (IU has one study per patient). The report text is rebuilt in MIMIC layout (banner line,
    every line starting with one space, ``EXAMINATION:``/``INDICATION:``/``COMPARISON:``/``FINDINGS:``/
    ``IMPRESSION:`` headers, blank lines ``" "`` between sections) so the same MIT-compatible sectioner
    applies. Projection ``Frontal`` → view_position ``PA`` and ``Lateral`` → ``LATERAL`` (IU does not say
    whether a frontal image is PA or AP; most are PA, and downstream code treats PA/AP alike as frontal);
    view_code_meaning keeps IU's own word (``frontal`` / ``lateral``). IU has no official split: a
    patient-level split is drawn from a seeded hash of the uid (default 7:1:2 train/validate/test, the
    ratios R2Gen uses), so a uid's split never depends on which other rows are present.

Report text is kept verbatim except for newline translation (``\\r\\n`` and ``\\r`` → ``\\n``), which is
what Python's text mode, and so MIT's script, sees.

Joining (MIMIC): a study's split comes from the split table and its ``study_datetime`` is the earliest
StudyDate + StudyTime of its images in the metadata table (StudyTime is a float ``HHMMSS.fff`` whose
leading zeros are lost: ``5014.5`` is 00:50:14.5). ``images`` holds the images of the written studies
only, with ``image_path`` ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` (MIMIC-CXR-JPG layout).

Counting: "N studies in" is every report file found (each copy of a duplicate counts, as does a file
whose name does not parse) plus every table study without a report file; each of them ends in
``studies`` or in ``rejects``, so N = out + rejected.

Reject reasons (the ``rejects`` table; ``detail`` names the file or member, never report text):

- ``bad_filename``: a report file in the tree whose name is not ``pNN/pSUBJECT/sSTUDY.txt`` in digits.
- ``duplicate_study``: the same study_id twice (a member twice in a zip, or two patients claiming one
  study). The first copy whose patient matches the split/metadata tables is kept and the others are
  rejected; if none matches, every copy is rejected.
- ``no_metadata``: a report whose study is absent from the split and/or the metadata table (IU: absent
  from indiana_projections.csv).
- ``subject_mismatch``: the report's patient folder disagrees with the study's patient in the tables.
- ``split_conflict``: the images of one study carry different splits, or one patient's studies do.
  Splits must be patient-disjoint (a patient in train and test leaks into every dataset built from
  them), and which split such a patient belongs to cannot be known, so **every** study of that patient
  is rejected; the rest of the run goes on. A split label other than train / validate / test stops the
  run with an error naming the split file and the labels.
- ``corrupt_member``: a zip member that cannot be inflated, fails its CRC-32, or uses an unsupported
  compression method; the rest of the archive is read normally.
- ``unreadable``: a report file that cannot be read (OSError).
- ``bad_symlink``: a symbolic link in the reports folder whose target is outside it, that loops or that
  points nowhere (a link to a folder counts once), or a symlink entry of the zip. Never followed; links
  that stay inside the folder are followed.
- ``undecodable``: bytes that are not UTF-8. Rejected rather than decoded with replacement characters,
  because mangled text would silently flow into every dataset built from it.
- ``empty_report``: empty or whitespace-only report (IU: neither findings nor impression).
- ``too_large``: a report above ``ingest.max_report_bytes`` (default 1 MiB). A file is read only up to
  the bound; a zip member whose declared size is above it is not inflated at all, and one that inflates
  past its declared size is stopped there (``corrupt_member``), so a zip bomb costs no more than its bound.
- ``no_report``: a study in the split/metadata tables (IU: in the projections) without a report.
- ``bad_id``: an id that is not an integer fitting int64: a report file whose subject/study number is
  beyond int64, a split/metadata table row whose study_id/subject_id is (one reject per table row; the
  run goes on without it), an IU uid.

A missing input path, an unreadable zip, a table without its required columns, or a reports folder
without any report file stop the run with an error naming the option and its config key.
"""
