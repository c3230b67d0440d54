"""Medical-CXR-VQA question generation: standardised findings + image metadata -> question/answer pairs.

Six question types, as in Medical-CXR-VQA (reference/medical_cxr_vqa.md §6): abnormality, presence,
view, location, level, type. Templates are data; answers are computed from the ``findings`` table; every
random choice comes from one seed (one generator per question type, so changing one type never
reshuffles another; per shard, from (seed, shard)).

Shards (``vqa.shards``): each ``shard`` job generates the questions of the patients with
``subject_id % shards == shard``; what must hold over the whole corpus (which splits have both views,
how often a level word occurs) it reads from the whole corpus's few columns (``prepare.Corpus``). Every
balance is exact within a shard, hence over the merged set. ``merge`` concatenates and computes the
CSV, the statistics, the leak probe and the rejects over all questions.

Two styles (``vqa.style``):
- ``medical_cxr_vqa`` (default, a drop-in replacement): the original's 13 fixed wordings
  (``libs/medical_cxr_vqa_templates.yaml``) and its answer forms: ``PA view`` / ``AP view``, locations
  ``<words> area``, side ``left side`` / ``right side``, levels as the report's level words (``small``,
  ``large``; recovered from the row's raw name / evidence, the ordinal level when there is none or it
  is rarer than ``level_word_min_count``), and the region question answered with one finding;
- ``clean``: our paraphrase pools (``libs/vqa_templates.yaml``), answers ``PA``, ``right basal``,
  ``left``, the five ordinal levels, and every finding at the asked region.
The fixes below hold in both styles.

What differs from the original ``question_gen.py`` on purpose:
- Findings are joined on their canonical name (integer codes), never by substring, so pericardial vs
  pleural effusion or "enlarged" vs cardiomegaly cannot be confused; a name outside the vocabulary
  (``unknown`` or anything else) is counted and skipped, never a crash.
- A location or left/right question is built from the rows of ONE (study, finding) group: the finding
  and its location cannot come from different findings.
- Yes/no questions are paired: for every "yes" question there is a "no" question with the same
  template, finding and location (presence), the same template (abnormality) or the same template
  and asked view (view). The question text alone therefore carries no information about the answer.
- "No" findings are drawn from the study's explicit negations and from findings the report does not
  mention, with the name distribution of the "yes" questions; never from uncertain findings, and
  never "unmentioned" in a study whose report has a positive finding we could not name.
- Studies without a frontal (PA/AP) image get no questions and are listed in ``rejects``; so is a
  frontal study left without any question. Normal studies (the key-information stage's per-study
  ``status``; without that table: findings rows but no positive or uncertain one) get the abnormality
  question ("no"); a study the stage did not read, or read as ``unknown``, is never called normal.
- ``split`` is the studies table's official split with MIMIC's names (train / validate / test). The
  released Medical-CXR-VQA CSV has no split column; its predecessor split CSV rows 80/10/10 by position.
- The view question is asked for as many AP as PA images in every split that has both views (the
  original kept 5 % of AP); a split with one view (a PA-only corpus) keeps all its view questions.
  Every rule that removes candidates logs how many, per type.

Outputs: ``questions.parquet`` (QUESTIONS), ``questions.csv`` (the original's columns), ``stats``
(VQA_STATS, per type and split), ``leak.csv`` (VQA_LEAK: a text-only classifier against the majority
answer) and ``rejects``.
"""
