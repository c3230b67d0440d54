"""Synthetic MIMIC-CXR corpus: the same files and layout as the real one, with the truth of every report.

``python -m tools.synth --out DIR --studies N --patients P --seed S`` writes, deterministically by seed:

* ``files/pXX/pSUBJECT/sSTUDY.txt`` (plus distractors the ingest must ignore) and the same reports as
  ``mimic-cxr-reports.zip`` (members ``files/p10/p10000032/s50414267.txt``, deflated);
* ``cxr-study-list.csv.gz``, ``cxr-record-list.csv.gz`` (MIMIC-CXR) and
  ``mimic-cxr-2.0.0-{split,metadata,chexpert}.csv.gz`` (MIMIC-CXR-JPG, the real columns);
* ``truth.parquet`` (``contract.SYNTH_TRUTH``): one row per finding mention a careful reader extracts
  from the findings / impression / last_paragraph section the MIT parser yields (its LAST section of
  that name), with the canonical values of ``libs/vocabulary.yaml``;
* ``truth_studies.parquet`` (``contract.SYNTH_STUDIES``): per study the report type (A-G, see
  ``REPORT_TYPES``), the parser branches it exercises (``features``), the section the MIT conclusion
  comes from, and the deliberate bad inputs (``bad``).

How the truth is made unambiguous (the rules extractor is built against these conventions):

* Every sentence is rendered from mentions by the templates below; a truth row carries ONLY the
  attributes the sentence actually states in the mention's own noun phrase (the level of "Interval
  increase in the left effusion" is null; "Left basilar opacity may reflect atelectasis" gives
  atelectasis no location).
* Negative mentions keep literally stated modifiers ("No focal consolidation" -> type focal) and never a
  change ("No new consolidation" -> negative, change null), except ``resolved`` ("Interval resolution of
  the left pleural effusion" -> negative, change resolved).
* Pseudo-negations are positive: "No change in the moderate cardiomegaly" -> positive, moderate,
  unchanged.
* Where the structure is part of the finding's name (elevated hemidiaphragm, blunting of the
  costophrenic angle) the location holds the laterality only. Support devices never carry a location.
* Sentences in NORMAL_STATEMENTS imply the listed negatives; NEUTRAL_SENTENCES imply nothing.
* Indication / history / comparison / wet read / addendum / notification text is never in the truth,
  even when it names a finding ("?pneumonia").
* The section of a truth row is where the MIT parser puts the sentence (computed by parsing the written
  report with ``mit_sections``), so quirks (swallowed headers, NOTE: false headers, duplicate
  IMPRESSION) are reflected: text the parser does not expose as findings/impression/last_paragraph
  yields no row. A sentence written twice into one parsed section gives its rows twice.
* Two instances of one finding with different laterality are two rows ("Small left and moderate right
  pleural effusions."); a sentence with several findings gives one row each.

Corpus shape: patients have 1..many studies in time order (Pareto-skewed, as in MIMIC), their chronic
findings persist and acute ones appear, change and resolve, so later reports compare with priors. About
40 % of studies are portable AP (one image, ICU devices), the rest PA + lateral (some studies lack the
frontal or the lateral image); ~1.65 images per study. The split is per patient (~97.8 / 0.8 / 1.4 % of
studies in train / validate / test, at least one patient each when there are three or more). Every
parser branch of reference/sectioning_radialog.md §1.3/§1.8 is forced onto at least one study
(``FORCED_FEATURES``), a few of MIT's special-cased study ids are reused (``SPECIAL_STUDIES``) and three
bad inputs are planted (``--no-bad`` to omit them).

Speed: each patient is generated from its own RNG (seed, subject_id), so worker processes (``--jobs``)
produce exactly the same corpus as one process; the parent streams the zip, the CSVs and the Parquet
tables (bounded memory), the workers write the report files.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime as dt
import gzip
import io
import itertools
import logging
import multiprocessing
import os
import random
import re
import time
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from workflow.cli import parser as cli_parser
from workflow.cli import setup_logging
from workflow.contract import SYNTH_STUDIES, SYNTH_TRUTH
from workflow.keyinfo.libs import load_libs, no_finding
from workflow.sections import SPECIAL_STUDIES as MIT_SPECIAL_STUDY_IDS
from workflow.tables import TableWriter

log = logging.getLogger(__name__)

# =========================================================================================================
# PHRASING TEMPLATES (data). The extractor of the keyinfo stage is built against these; keep them explicit.
# =========================================================================================================

# Canonical level -> surface words. "size" findings (collections, air, lumps) use size words, the others
# severity words. "small" -> mild and "large" -> severe (libs/vocabulary.yaml); "trace" -> minimal.
LEVEL_WORDS = {
    "size": {
        "minimal": ["trace", "tiny"],
        "mild": ["small"],
        "moderate": ["moderate"],
        "severe": ["large"],
        "massive": ["massive"],
    },
    "severity": {"minimal": ["minimal"], "mild": ["mild"], "moderate": ["moderate"], "severe": ["severe"]},
}
# "The heart is moderately enlarged."
LEVEL_ADVERBS = {"minimal": "minimally", "mild": "mildly", "moderate": "moderately", "severe": "severely"}

# Canonical location -> (pre-modifiers, post-modifiers). Location strings are the space-joined canonical
# tokens laterality zone structure. "lung" is never used as a mere filler word ("right base", not
# "right lung base") so that it only appears where the location really states it.
LOCATION_WORDS: dict[str, tuple[list[str], list[str]]] = {
    "left": (["left", "left-sided"], ["on the left"]),
    "right": (["right", "right-sided"], ["on the right"]),
    "bilateral": (["bilateral"], ["bilaterally"]),
    "left basal": (["left basilar", "left basal"], ["at the left base"]),
    "right basal": (["right basilar", "right basal"], ["at the right base"]),
    "bilateral basal": (["bibasilar", "bilateral basilar"], ["at both bases"]),
    "left apical": (["left apical"], ["at the left apex"]),
    "right apical": (["right apical"], ["at the right apex"]),
    "bilateral apical": (["biapical", "bilateral apical"], ["at both apices"]),
    "left lower lobe": (["left lower lobe"], ["in the left lower lobe"]),
    "right lower lobe": (["right lower lobe"], ["in the right lower lobe"]),
    "right middle lobe": (["right middle lobe"], ["in the right middle lobe"]),
    "right upper lobe": (["right upper lobe"], ["in the right upper lobe"]),
    "left upper lobe": (["left upper lobe"], ["in the left upper lobe"]),
    "lingula": (["lingular"], ["in the lingula"]),
    "retrocardiac": (["retrocardiac"], ["in the retrocardiac region"]),
    "perihilar": (["perihilar"], ["in the perihilar regions"]),
    "bilateral perihilar": (["bilateral perihilar"], []),
    "right perihilar": (["right perihilar"], []),
    "left hemithorax": ([], ["in the left hemithorax"]),
    "right hemithorax": ([], ["in the right hemithorax"]),
    "rib": (["rib"], []),  # only in negatives: "No displaced rib fracture"
    "left rib": (["left rib"], ["of a left rib"]),
    "right rib": (["right rib"], ["of a right rib"]),
    "left clavicle": (["left clavicular"], ["of the left clavicle"]),
    "right clavicle": (["right clavicular"], ["of the right clavicle"]),
    "spine": ([], ["of the thoracic spine", "in the thoracic spine"]),
    "left chest wall": (["left chest wall"], ["in the left chest wall"]),
    "right chest wall": (["right chest wall"], ["along the right chest wall"]),
    "right hilum": (["right hilar"], ["in the right hilum"]),
    "left hilum": (["left hilar"], ["in the left hilum"]),
    "bilateral hilum": (["bilateral hilar"], []),
    "mediastinum": (["mediastinal"], ["in the mediastinum"]),
    "right lung": ([], ["in the right lung"]),
    "left lung": ([], ["in the left lung"]),
}
# For names whose own words hold the structure ("elevation of the {lat}hemidiaphragm"): laterality only.
LATERALITY_INSERT = {"left": ["left "], "right": ["right "], "bilateral": ["both "]}

LOBES = ["left lower lobe", "right lower lobe", "right middle lobe", "right upper lobe", "left upper lobe"]
BASES = ["left basal", "right basal", "bilateral basal"]


@dataclass(frozen=True)
class Form:
    """How a finding is written. ``forms`` are (singular, plural[, flags]) surface names, None = no such
    number; the first form is written 3x as often as each other one. Flags: "m" = mass noun (no article),
    "t" = takes no type word. A ``{lat}`` in a form takes the laterality (location = laterality only)."""

    forms: tuple[tuple, ...]
    scale: str | None = None  # "size" | "severity" | None (no level words)
    levels: tuple[str, ...] = ()
    locations: tuple[str | None, ...] = (None,)
    types: tuple[str | None, ...] = (None,)
    countable: bool = True


FINDING_FORMS: dict[str, Form] = {
    "pleural effusion": Form(
        (("pleural effusion", "pleural effusions"), ("effusion", "effusions"), ("pleural fluid", None, "mt")),
        "size",
        ("minimal", "mild", "moderate", "severe"),
        (None, "left", "right", "bilateral"),
        (None, None, "layering", "loculated"),
    ),
    "pneumothorax": Form(
        (("pneumothorax", None),),
        "size",
        ("minimal", "mild", "moderate", "severe"),
        ("left", "right", "left apical", "right apical", "right basal"),
    ),
    "atelectasis": Form(
        (("atelectasis", None), ("volume loss", None, "t")),
        "severity",
        ("minimal", "mild"),
        (None, *BASES, "left lower lobe", "right lower lobe", "right middle lobe", "retrocardiac", "lingula"),
        (None, None, "plate-like", "linear", "subsegmental", "patchy", "streaky", "compressive"),
        countable=False,
    ),
    "consolidation": Form(
        (("consolidation", None),),
        "severity",
        ("mild", "moderate"),
        (*LOBES, "retrocardiac", "left basal", "right basal", "lingula"),
        (None, None, "patchy", "focal", "confluent", "multifocal"),
        countable=False,
    ),
    "pneumonia": Form(
        (("pneumonia", None),),
        None,
        (),
        (None, *LOBES, "lingula", "right basal", "left basal"),
        (None, None, "multifocal"),
        countable=False,
    ),
    # no "airspace disease": "airspace" is also a type word, so its type would be ambiguous
    "lung opacity": Form(
        (("opacity", "opacities"), ("opacification", None)),
        "severity",
        ("mild",),
        (None, *LOBES, *BASES, "retrocardiac", "left apical", "right perihilar", "lingula"),
        (None, "patchy", "hazy", "ground-glass", "streaky", "linear", "confluent"),
    ),
    # its own finding (ChestX-ray14's Infiltration); CheXpert folds it into Lung Opacity (libs/findings.csv)
    "infiltrate": Form(
        (("infiltrate", "infiltrates"),),
        "severity",
        ("mild",),
        (None, *LOBES, *BASES, "retrocardiac", "right perihilar"),
        (None, "patchy", "interstitial"),
    ),
    "edema": Form(
        (("pulmonary edema", None), ("edema", None)),
        "severity",
        ("mild", "moderate", "severe"),
        (None, None, None, "perihilar", "bilateral"),
        (None, None, "interstitial", "alveolar"),
        countable=False,
    ),
    "vascular congestion": Form(
        (
            ("pulmonary vascular congestion", None),
            ("vascular congestion", None),
            ("pulmonary venous congestion", None),
            ("vascular engorgement", None),
        ),
        "severity",
        ("mild", "moderate"),
        countable=False,
    ),
    "cardiomegaly": Form(
        (("cardiomegaly", None), ("cardiac enlargement", None)),
        "severity",
        ("mild", "moderate", "severe"),
        countable=False,
    ),
    "enlarged cardiomediastinum": Form(
        (("enlargement of the cardiomediastinal silhouette", None), ("widening of the mediastinum", None)),
        "severity",
        ("mild",),
        countable=False,
    ),
    "nodule": Form(
        (("nodule", "nodules"), ("pulmonary nodule", "pulmonary nodules")),
        "size",
        ("mild",),
        (None, *LOBES, "lingula"),
    ),
    "mass": Form(
        (("mass", None),),
        "size",
        ("mild", "severe"),
        ("right upper lobe", "left upper lobe", "right hilum", "left hilum", "right lung"),
    ),
    "granuloma": Form((("granuloma", "granulomas"),), "size", ("mild",), (None, *LOBES), (None, "calcified")),
    "emphysema": Form((("emphysema", None),), "severity", ("mild", "moderate", "severe"), countable=False),
    "hyperinflation": Form((("hyperinflation", None),), "severity", ("mild",), countable=False),
    "fibrosis": Form(
        (("pulmonary fibrosis", None), ("fibrosis", None)),
        "severity",
        ("mild", "moderate"),
        (None, "bilateral basal", "bilateral apical"),
        countable=False,
    ),
    "scarring": Form(
        (("scarring", None),),
        "severity",
        ("minimal", "mild"),
        ("left apical", "right apical", "bilateral apical", "left basal", "right basal"),
        (None, "linear"),
        countable=False,
    ),
    "pleural thickening": Form(
        (("pleural thickening", None),),
        "severity",
        ("mild",),
        ("left apical", "right apical", "bilateral apical", "left", "right"),
        countable=False,
    ),
    "blunting of the costophrenic angle": Form(
        (("blunting of the {lat}costophrenic angle", "blunting of {lat}costophrenic angles"),),
        "severity",
        ("mild",),
        ("left", "right", "bilateral"),
        countable=False,
    ),
    "interstitial markings": Form(
        ((None, "interstitial markings"),),
        "severity",
        ("mild",),
        (None, "bilateral basal"),
        (None, "chronic"),
    ),
    "fracture": Form(
        (("fracture", "fractures"),),
        None,
        (),
        ("left rib", "right rib", "left clavicle", "right clavicle"),
        (None, "healed", "healed", "displaced", "nondisplaced", "acute"),
    ),
    "hiatal hernia": Form(
        (("hiatal hernia", None), ("hiatus hernia", None)), "size", ("mild", "moderate", "severe")
    ),
    "calcification": Form(
        (("calcification", "calcifications"),), None, (), ("right hilum", "left hilum", "mediastinum")
    ),
    "pneumomediastinum": Form((("pneumomediastinum", None),), "size", ("mild",), countable=False),
    "subcutaneous emphysema": Form(
        (("subcutaneous emphysema", None), ("subcutaneous air", None)),
        "severity",
        ("mild", "moderate"),
        (None, "left chest wall", "right chest wall"),
        countable=False,
    ),
    "pneumoperitoneum": Form((("pneumoperitoneum", None),), "size", ("mild",), countable=False),
    "pericardial effusion": Form((("pericardial effusion", None),), "size", ("mild", "moderate")),
    "tortuous aorta": Form(
        (("tortuous aorta", None), ("unfolded aorta", None))
    ),  # level only as "mildly tortuous" (TORTUOUS_TEMPLATES)
    "aortic calcification": Form(
        (
            ("aortic calcification", "aortic calcifications"),
            ("calcification of the aortic knob", None),
            ("atherosclerotic calcification", None),
        ),
        "severity",
        ("mild",),
        countable=False,
    ),
    "scoliosis": Form((("scoliosis", None),), "severity", ("mild", "moderate", "severe"), countable=False),
    "degenerative changes": Form(
        ((None, "degenerative changes"),), "severity", ("mild", "moderate"), (None, "spine")
    ),
    "elevated hemidiaphragm": Form(
        (("elevation of the {lat}hemidiaphragm", None), ("elevated {lat}hemidiaphragm", None)),
        "severity",
        ("mild", "moderate"),
        ("left", "right"),
    ),
    "bronchiectasis": Form(
        (("bronchiectasis", None),),
        "severity",
        ("mild",),
        (None, "bilateral basal", "right lower lobe"),
        countable=False,
    ),
    "lymphadenopathy": Form(
        (("lymphadenopathy", None),),
        None,
        (),
        ("right hilum", "left hilum", "bilateral hilum", "mediastinum"),
        countable=False,
    ),
    "aspiration": Form(
        (("aspiration", None),), None, (), (None, "right lower lobe", "bilateral basal"), countable=False
    ),
    "hilar congestion": Form((("hilar congestion", None),), "severity", ("mild",), countable=False),
    "heart failure": Form(
        (("congestive heart failure", None), ("heart failure", None)),
        "severity",
        ("mild", "moderate"),
        countable=False,
    ),
    "lesion": Form((("lesion", None),), None, (), ("right upper lobe", "left lower lobe", "right lung")),
    "hematoma": Form((("hematoma", None),), "size", ("mild",), ("left chest wall", "right chest wall")),
}

# Positive sentences by the change they express. {NP} = noun phrase ([level] [type] [location] name
# [location]), {The} = optional "The "; {be}/{have} agree with the noun phrase. The flag says whether the
# noun phrase may state the level (for improved/worsened a level would be ambiguous: before or now?).
POSITIVE_TEMPLATES: dict[str | None, list[tuple[str, bool]]] = {
    None: [
        ("{NP}.", True),
        ("There {be} {a}{NP}.", True),
        ("{The}{NP} {be} present.", True),
        ("{The}{NP} {be} noted.", True),
        ("{The}{NP} {be} seen.", True),
    ],
    "new": [
        ("New {NP}.", True),
        ("There {be} {a}new {NP}.", True),
        ("There {be} {a}{NP}, new since the prior study.", True),
        ("{NP} {be} new compared to the prior radiograph.", True),
        ("Interval development of {a}{NP}.", True),
    ],
    "unchanged": [
        ("{The}{NP} {be} unchanged.", True),
        ("{The}{NP} {be} stable.", True),
        ("Again seen {be} {a}{NP}.", True),
        ("{The}{NP} {be} again seen.", True),
        ("Persistent {NP}.", True),
        ("Stable {NP}.", True),
        ("No change in the {NP}.", True),
        ("No significant interval change in the {NP}.", True),
        ("There has been no change in the {NP}.", True),
        ("Unchanged {NP}.", True),
        ("{The}{NP} {be} not significantly changed.", True),
    ],
    "improved": [
        ("{The}{NP} {have} improved.", False),
        ("{The}{NP} {have} decreased.", False),
        ("Interval improvement in the {NP}.", False),
        ("Improving {NP}.", False),
        ("Decreased {NP}.", False),
        ("There {be} {a}{NP}, improved since the prior study.", True),
    ],
    "worsened": [
        ("{The}{NP} {have} increased.", False),
        ("{The}{NP} {have} worsened.", False),
        ("Interval increase in the {NP}.", False),
        ("Worsening {NP}.", False),
        ("Increased {NP}.", False),
        ("There {be} {a}{NP}, increased since the prior study.", True),
    ],
}
# Two instances of one finding with different laterality in one sentence (one row each).
PAIR_TEMPLATES = [
    "{L1} left and {L2} right {PLURAL}.",
    "{L1} right and {L2} left {PLURAL}.",
    "There are {L1} left and {L2} right {PLURAL}.",
]
# Two positive mentions in one sentence (one row each).
POSITIVE_PAIR_TEMPLATES = ["{NP1} and {NP2}.", "There {be1} {a1}{NP1} and {a2}{NP2}.", "{NP1} with {NP2}."]
# A positive resolved mention is written as a negative with change 'resolved'.
RESOLVED_TEMPLATES = [
    "Interval resolution of the {NP}.",
    "{The}{NP} {have} resolved.",
    "The previously seen {NP} {have} resolved.",
    "{The}{NP} {be} no longer seen.",
]

# Negatives: surface -> (name, type, location) as literally stated.
NEGATIVE_FORMS: dict[str, list[tuple[str, str | None, str | None]]] = {
    "pleural effusion": [
        ("pleural effusion", None, None),
        ("pleural effusions", None, None),
        ("effusion", None, None),
    ],
    "pneumothorax": [("pneumothorax", None, None)],
    "consolidation": [
        ("focal consolidation", "focal", None),
        ("consolidation", None, None),
        ("confluent consolidation", "confluent", None),
    ],
    "edema": [("pulmonary edema", None, None), ("edema", None, None)],
    "pneumonia": [("pneumonia", None, None)],
    "vascular congestion": [
        ("pulmonary vascular congestion", None, None),
        ("vascular congestion", None, None),
    ],
    "cardiomegaly": [("cardiomegaly", None, None)],
    "lung opacity": [("focal opacity", "focal", None), ("opacity", None, None)],
    "atelectasis": [("atelectasis", None, None)],
    "fracture": [
        ("displaced fracture", "displaced", None),
        ("displaced rib fracture", "displaced", "rib"),
        ("fracture", None, None),
    ],
    "pneumomediastinum": [("pneumomediastinum", None, None)],
    "nodule": [("pulmonary nodules", None, None)],
    "mass": [("mass", None, None)],
    "pneumoperitoneum": [("pneumoperitoneum", None, None)],
    "pericardial effusion": [("pericardial effusion", None, None)],
    "hiatal hernia": [("hiatal hernia", None, None)],
    "subcutaneous emphysema": [("subcutaneous emphysema", None, None)],
}
NEGATIVE_TEMPLATES = {
    1: [
        "No {0}.",
        "There is no {0}.",
        "No evidence of {0}.",
        "No {0} is seen.",
        "There is no evidence of {0}.",
        "No new {0}.",
        "No {0} is identified.",
    ],
    2: [
        "No {0} or {1}.",
        "There is no {0} or {1}.",
        "No {0} or {1} is seen.",
        "No evidence of {0} or {1}.",
        "No {0} or {1} is identified.",
    ],
    3: [
        "No {0}, {1}, or {2}.",
        "There is no {0}, {1} or {2}.",
        "No {0}, {1} or {2} is seen.",
        "There is no evidence of {0}, {1}, or {2}.",
    ],
}
# A negative tail appended to a positive or normal sentence: "Moderate left effusion, without pneumothorax."
WITHOUT_TEMPLATES = {
    1: [", without {0}.", " without {0}.", " without evidence of {0}."],
    2: [", without {0} or {1}.", " without {0} or {1}."],
}

# Uncertain mentions (hedged). "early" and "superimposed" carry no attribute.
UNCERTAIN_TEMPLATES = [
    "{NP} cannot be excluded.",
    "Cannot exclude {NP}.",
    "Possible {NP}.",
    "{NP} {be} not excluded.",
    "Superimposed {NP} cannot be excluded.",
    "Questionable {NP}.",
    "{NP} may be present.",
]
UNCERTAIN_EARLY = ["Early {NP} cannot be excluded.", "Cannot exclude early {NP}."]
# A positive opacity with hedged causes: the opacity is positive with its attributes, the causes are
# uncertain without attributes.
OPACITY_CAUSE_TEMPLATES = [
    "{OP} may represent {0} or {1}.",
    "{OP}, which may reflect {0} or {1}.",
    "{OP} could reflect {0}, though {1} cannot be excluded.",
    "{OP} may represent {0}.",
]
OPACITY_CAUSES = ["atelectasis", "pneumonia", "aspiration"]

# Normal statements: the negatives they imply (name, location).
NORMAL_STATEMENTS: dict[str, list[str]] = {
    "The lungs are clear.": ["lung opacity"],
    "Lungs are clear.": ["lung opacity"],
    "Heart size is normal.": ["cardiomegaly"],
    "The heart is normal in size.": ["cardiomegaly"],
    "Normal heart size.": ["cardiomegaly"],
    "The cardiomediastinal silhouette is normal.": ["enlarged cardiomediastinum"],
    "Normal cardiomediastinal silhouette.": ["enlarged cardiomediastinum"],
    "Heart size and mediastinal contours are normal.": ["cardiomegaly", "enlarged cardiomediastinum"],
    "Pulmonary vascularity is normal.": ["vascular congestion"],
}
LUNG_NORMALS = ["The lungs are clear.", "Lungs are clear."]
HEART_NORMALS = [
    "Heart size is normal.",
    "The heart is normal in size.",
    "Normal heart size.",
    "The cardiomediastinal silhouette is normal.",
    "Normal cardiomediastinal silhouette.",
    "Heart size and mediastinal contours are normal.",
]
# Sentences that state nothing a finding row records.
NEUTRAL_SENTENCES = [
    "No acute osseous abnormality.",
    "The visualized osseous structures are unremarkable.",
    "Hilar contours are unremarkable.",
    "Bony structures are intact.",
    "There is no acute bony abnormality.",
]
# Neutral technique sentences that may open a findings section.
FINDINGS_OPENERS = [
    "PA and lateral views of the chest were obtained.",
    "Single portable view of the chest.",
    "AP upright and lateral views of the chest were provided.",
]
# Look-alikes that name no finding (a careful reader extracts nothing): shadows, lines, skin folds.
LOOKALIKE_SENTENCES = [
    "Bilateral nipple shadows are noted.",
    "A skin fold projects over the right hemithorax.",
    "Overlying breast shadows limit evaluation of the lung bases.",
    "The paratracheal stripe is normal.",
    "The azygoesophageal line is preserved.",
    "Soft tissue density over the left base likely reflects overlying breast tissue.",
]
NO_ACUTE = [
    "No acute cardiopulmonary process.",
    "No acute intrathoracic process.",
    "No acute cardiopulmonary abnormality.",
    "No radiographic evidence of acute disease.",
]
# Follow-up impressions: a change statement without a finding (no row).
NO_INTERVAL_CHANGE = [
    "No significant interval change.",
    "Little change from the prior study.",
    "Overall, no substantial change since the prior radiograph.",
]
# Cardiomegaly stated as an enlarged heart: "The heart is moderately enlarged." (positive, level).
CARDIOMEGALY_TEMPLATES = [
    "The heart is {adv} enlarged.",
    "Heart size is {adv} enlarged.",
    "The heart is {adv} enlarged, unchanged.",
    "{Level} enlargement of the cardiac silhouette.",
]
HYPERINFLATION_TEMPLATES = ["The lungs are hyperinflated.", "The lungs are hyperinflated, unchanged."]
TORTUOUS_TEMPLATES = ["The thoracic aorta is tortuous.", "The aorta is {adv} tortuous."]

# Support devices: raw name -> sentences by change (location is never recorded for devices).
DEVICES: dict[str, dict[str | None, list[str]]] = {
    "endotracheal tube": {
        None: [
            "An endotracheal tube terminates {n} cm above the carina.",
            "The endotracheal tube is in standard position.",
        ],
        "unchanged": ["The endotracheal tube is in unchanged position, {n} cm above the carina."],
        "new": ["A new endotracheal tube terminates {n} cm above the carina."],
    },
    "nasogastric tube": {
        None: [
            "A nasogastric tube courses below the diaphragm with the tip in the stomach.",
            "The nasogastric tube tip is in the stomach.",
        ],
        "unchanged": ["The nasogastric tube is unchanged in position."],
        "new": ["A new nasogastric tube extends into the stomach."],
    },
    "central venous catheter": {
        None: [
            "A right internal jugular central venous catheter terminates in the mid SVC.",
            "A left subclavian central venous catheter ends in the low SVC.",
        ],
        "unchanged": ["The right internal jugular catheter is unchanged, terminating in the mid SVC."],
        "new": [
            "A new right internal jugular central venous catheter terminates at the cavoatrial junction."
        ],
    },
    "PICC line": {
        None: ["A left-sided PICC line terminates in the low SVC.", "A right PICC line ends in the mid SVC."],
        "unchanged": ["The PICC line is in unchanged position."],
        "new": ["A new right PICC line terminates in the low SVC."],
    },
    "pacemaker": {
        None: [
            "A left-sided pacemaker is noted with leads terminating in the right atrium and right ventricle.",
            "Dual-lead pacemaker device is in place.",
        ],
        "unchanged": ["The pacemaker leads are unchanged in position."],
    },
    "sternotomy wires": {
        None: ["Median sternotomy wires are intact.", "The patient is status post median sternotomy."],
        "unchanged": ["Sternotomy wires are unchanged."],
    },
    "chest tube": {
        None: ["A right-sided chest tube is in place.", "A left basilar chest tube is present."],
        "unchanged": ["The chest tube is unchanged in position."],
        "new": ["A new right chest tube has been placed."],
    },
    "Swan-Ganz catheter": {
        None: ["A Swan-Ganz catheter terminates in the right pulmonary artery."],
        "unchanged": ["The Swan-Ganz catheter is unchanged in position."],
    },
}
ICU_DEVICES = [
    "endotracheal tube",
    "nasogastric tube",
    "central venous catheter",
    "PICC line",
    "chest tube",
    "Swan-Ganz catheter",
]
CHRONIC_DEVICES = ["pacemaker", "sternotomy wires"]
# Per portable study of an ICU-ish patient (chronic devices: per patient).
DEVICE_INCIDENCE = {
    "endotracheal tube": 0.35,
    "nasogastric tube": 0.3,
    "central venous catheter": 0.2,
    "PICC line": 0.15,
    "chest tube": 0.08,
    "Swan-Ganz catheter": 0.04,
    "pacemaker": 0.07,
    "sternotomy wires": 0.09,
}

# Text around the findings (never in the truth).
INDICATIONS = [
    "___ year old {sex} with ?pneumonia",
    "___ year old {sex} with shortness of breath  // ?effusion",
    "___ year old {sex} with fever and cough  // r/o pna",
    "___ year old {sex} intubated  // ETT placement",
    "___ year old {sex} with chest pain",
    "___ year old {sex} with CHF exacerbation  // ?edema",
    "___ year old {sex} s/p chest tube placement  // ?pneumothorax",
    "Preoperative evaluation.",
    "___ year old {sex} with hypoxia  // eval for consolidation",
    "___ with cough, ?infiltrate",
    "___ year old {sex} with new central line  // line placement",
    "History: ___ with dyspnea",
]
TECHNIQUES = {
    "pa": ["Chest PA and lateral", "PA and lateral views of the chest.", "Frontal and lateral views"],
    "ap": ["Portable AP chest radiograph.", "Single frontal view of the chest.", "AP portable upright"],
    "other": ["Chest radiograph, single view."],
}
COMPARISONS_FIRST = ["None.", "None available.", "No prior studies."]
COMPARISONS = [
    "___",
    "___.",
    "Chest radiograph ___.",
    "Prior chest radiographs ___ and ___.",
    "Multiple prior studies, most recently ___.",
]
COMPARISON_LEADS = [
    "In comparison with the study of ___, ",
    "Compared to the prior study, ",
    "As compared to the previous radiograph, ",
]
COMMUNICATIONS = [
    "The findings were discussed with Dr. ___ by Dr. ___ by telephone at 10:30 AM on ___, "
    "___ minutes after discovery.",
    "Findings were communicated to Dr. ___ at 4:15 PM on ___ by phone.",
    "Dr. ___ was notified of the findings at 11:05 PM.",
]
NOTIFICATIONS = [
    "The findings were discussed with Dr. ___ by ___ on the telephone on ___ at 9:42 AM, "
    "___ minutes after discovery of the findings.",
    "Findings discussed with Dr. ___ at 2:20 PM on ___.",
]
RECOMMENDATIONS = [
    "Follow-up chest radiograph is recommended after treatment.",
    "Recommend dedicated chest CT for further characterization.",
]
ADDENDA = [
    "Dr. ___ was paged with these results at 8:10 PM.",
    "The study was reviewed with the referring clinician at 3:30 PM on ___.",
]
NOTES = [
    "NOTE: Dr. ___ was informed of these results at 10:45 AM.",
    "NOTE: The patient is rotated, limiting evaluation.",
]
NONDIAGNOSTIC = [
    "This study was ordered in error and was not performed.",
    "Please refer to the dedicated CT of the same day for the interpretation.",
    "The images were reviewed; see separate report for interpretation.",
]
BANNER = " " * 33 + "FINAL REPORT"
UNDERSCORES = " " + "_" * 78

# =========================================================================================================
# Section headers (reference/sectioning_radialog.md §1.3): every alias, substring, regex and unmapped case.
# =========================================================================================================
HEADER_ALIASES = {
    "impression": [
        "IMPRESSION",
        "CONCLUSION",
        "FINDINGS AND IMPRESSION",
        "FINDINGS/IMPRESSION",
        "FINDINGS/ IMPRESSION",
        "IMPRESSON",
        "IMPRRESSION",
        "IMORESSION",
        "IMPRESSOIN",
        "IMPRSSION",
        "IMPRESION",
        "IMPERSSION",
        "MPRESSION",
        "IMPESSION",
    ],
    "findings": [
        "FINDINGS",
        "CHEST, TWO VIEWS",
        "FINDING",
        "FINDINS",
        "FINDINDGS",
        "FINDGINGS",
        "FINDNGS",
        "FINDNINGS",
        "FINIDNGS",
        "REFERENCE FINDINGS",
    ],
    "comparison": [
        "COMPARISON",
        "COMPARISONS",
        "REFERENCE EXAM",
        "COMPARISON EXAM",
        "COMPARISON FILM",
        "COMPARISION",
        "COMPARSION",
        "COMPARRISON",
        "COMPARISIONS",
    ],
    "indication": [
        "INDICATION",
        "REASON FOR EXAMINATION",
        "REASON FOR EXAM",
        "CLINICAL INDICATION",
        "IDICATION",
    ],
    "examination": ["EXAMINATION", "EXAM", "TYPE OF EXAMINATION"],
    "technique": ["TECHNIQUE"],
    "history": ["HISTORY", "CLINICAL HISTORY", "CLINICAL INFORMATION", "PATIENT HISTORY", "PFI"],
    "notification": ["NOTIFICATION"],
    "recommendations": ["RECOMMENDATION(S)", "RECOMMENDATIONS", "RECOMMENDATION"],
    "addendum": ["ADDENDUM"],
    "date": ["DATE"],
    "comment": ["COMMENT"],
    "wet read": ["WET READ", "WETREAD"],
}
HEADER_SUBSTRING = {
    "impression": ["IMPRESSION AND RECOMMENDATIONS"],
    "findings": ["PERTINENT FINDINGS"],
    "history": ["HISTORY OF PRESENT ILLNESS"],
    "comparison": ["COMPARISON STUDY"],
    "addendum": ["ADDENDUM TO REPORT"],
}
# MIT's "describes the whole study" regex (-> findings): one header per alternative.
HEADER_WHOLE_STUDY = [
    "PORTABLE CHEST",
    "CHEST (PA AND LAT)",
    "PA AND LATERAL VIEWS",
    "LATERAL AND PA VIEWS",
    "AP AND LATERAL VIEWS",
    "LATERAL AND AP VIEWS",
    "FRONTAL AND LATERAL VIEWS",
    "TWO VIEWS",
    "FRONTAL VIEW",
    "PA VIEW",
    "AP VIEW",
    "ONE VIEW",
    "LATERAL VIEW",
    "BONE WINDOW",
    "FRONTAL UPRIGHT",
    "FRONTAL SEMI-UPRIGHT",
    "RIBS",
    "PA AND LAT",
]
HEADER_UNMAPPED = ["PROVIDER", "REASON", "PROCEDURE", "CLINICAL QUESTION"]

# Report types and their share of studies (reference §2.5).
REPORT_TYPES = {
    "A": 0.60,  # template with FINDINGS and IMPRESSION
    "B": 0.20,  # impression only (portables)
    "C": 0.10,  # findings only
    "D": 0.04,  # no findings/impression; last section has body paragraphs -> last_paragraph
    "E": 0.035,  # header-less, several paragraphs -> full report + last_paragraph
    "F": 0.015,  # no conclusion at all ('')
    "G": 0.01,  # comparison is the only conclusion
}


# Forced features: every parser branch appears at least once in any corpus with enough studies.
# Each entry is (feature, report types it can live in).
def _forced_features() -> list[tuple[str, str]]:
    forced: list[tuple[str, str]] = [(f"type:{t}", t) for t in REPORT_TYPES]
    for canon, headers in HEADER_ALIASES.items():
        for h in headers:
            forced.append(
                (f"alias:{h}", "AB" if canon == "impression" else "AC" if canon == "findings" else "A")
            )
    for canon, headers in HEADER_SUBSTRING.items():
        for h in headers:
            forced.append((f"substring:{h}", "A" if canon != "findings" else "AC"))
    for h in HEADER_WHOLE_STUDY:
        forced.append((f"regex:{h}", "AC"))
    for h in HEADER_UNMAPPED:
        forced.append((f"unmapped:{h}", "A"))
    forced += [
        ("ndication", "A"),
        ("empty_title", "A"),
        ("dup_findings_empty", "A"),
        ("dup_impression", "A"),
        ("swallow", "A"),
        ("note_false_header", "A"),
        ("no_leading_space", "A"),
        ("lowercase_header", "A"),
        ("digit_header", "A"),
        ("wet_read", "A"),
        ("addendum", "A"),
        ("numbered_impression", "AB"),
        ("notification", "A"),
        ("recommendations", "A"),
        ("comparison_lead", "AB"),
        ("communication", "AB"),
        ("pair_laterality", "AC"),
        ("type:F:notification", "F"),
        ("type:D:history", "D"),
    ]
    return forced


FORCED_FEATURES = _forced_features()

# Special studies of MIT's create_section_files.py (reference §1.4): (study, subject, feature, extra section).
SPECIAL_STUDIES = [
    (50913680, 11851243, "custom_section_names:recommendations", "RECOMMENDATION(S)"),
    (59363654, 12128253, "custom_section_names:examination", "EXAMINATION"),
    (59279892, 13150370, "custom_section_names:technique", "TECHNIQUE"),
    (57936451, 14325424, "custom_section_names:indication", "INDICATION"),
    (56451190, 11842879, "custom_section_names:note", "NOTE"),
    (51491012, 19314266, "custom_section_names:history", "HISTORY"),
    (50525523, None, "custom_indices:201:349", None),
    (57564132, None, "custom_indices:233:554", None),
    (58235663, None, "custom_indices:0:0", None),
]

CHEXPERT_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
# Canonical name -> CheXpert label: libs/findings.csv, the one mapping every stage reads.
CHEXPERT_OF = {name: cls for name, cls in load_libs().chexpert.items() if cls}

METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "AP AXIAL": "antero-posterior",
    "AP LLD": "left lateral decubitus",
    "XTABLE LATERAL": "lateral",
    "RAO": "right anterior oblique",
    "SWIMMERS": "lateral",
    "": "",
}
# Study kinds: (procedure, share, [(views, weight)]).
STUDY_KINDS = [
    (
        "CHEST (PA AND LAT)",
        0.55,
        [
            (("PA", "LATERAL"), 0.80),
            (("PA", "LL"), 0.04),
            (("PA",), 0.03),
            (("LATERAL",), 0.02),
            (("PA", "PA", "LATERAL"), 0.04),
            (("PA", "LATERAL", "LATERAL"), 0.04),
            (("", "LATERAL"), 0.02),
            (("AP", "LATERAL"), 0.02),
        ],
    ),
    (
        "CHEST (PORTABLE AP)",
        0.40,
        [(("AP",), 0.83), (("AP", "AP"), 0.10), (("",), 0.03), (("AP", "LATERAL"), 0.04)],
    ),
    ("CHEST (PRE-OP PA & LAT)", 0.02, [(("PA", "LATERAL"), 1.0)]),
    ("CHEST (SINGLE VIEW)", 0.015, [(("PA",), 0.5), (("AP",), 0.5)]),
    ("RIB BILAT, W/AP CHEST", 0.005, [(("AP", "AP AXIAL", "RAO"), 1.0)]),
    ("CHEST (LAT DECUB ONLY)", 0.005, [(("AP LLD",), 1.0)]),
    ("TRAUMA #3 (PORT CHEST ONLY)", 0.01, [(("AP",), 0.7), (("XTABLE LATERAL", "AP"), 0.3)]),
    ("DX CHEST PORT LINE/TUBE PLCMT 1 EXAM", 0.01, [(("AP",), 1.0)]),
]


# =========================================================================================================
# The MIT-LCP section parser semantics (reference §1.2-1.4), used to place each truth row in the section
# where the parser shows it. Deliberately independent of workflow.sections (a cross-check, see tests).
# =========================================================================================================
_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
_EXACT = {
    "preamble": "preamble",
    "impression": "impression",
    "conclusion": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "ndication": "impression",
    "findings": "findings",
    "chest, two views": "findings",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "reference findings": "findings",
    "comparison": "comparison",
    "comparisons": "comparison",
    "reference exam": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
    "indication": "indication",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "clinical indication": "indication",
    "idication": "indication",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "pfi": "history",
    "notification": "notification",
    "recommendation(s)": "recommendations",
    "recommendations": "recommendations",
    "recommendation": "recommendations",
    "addendum": "addendum",
    "date": "date",
    "comment": "comment",
    "wet read": "wet read",
    "wetread": "wet read",
}
_SUBSTRINGS = ("impression", "findings", "history", "comparison", "addendum")
_WHOLE = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    r"two views|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    r"frontal semi-upright|ribs|pa and lat"
)


def _normalize(name: str) -> str:
    name = name.lower().strip()
    if name in _EXACT:
        return _EXACT[name]
    for s in _SUBSTRINGS:
        if s in name:
            return s
    if _WHOLE.search(name):
        return "findings"
    return name


def mit_sections(text: str) -> tuple[list[str], list[str]]:
    """(names, texts) of the report's sections as MIT's ``section_text`` + normalisation + empty-drop +
    last_paragraph produce them."""
    matches = list(_HEADER.finditer(text))
    if not matches:
        names, texts = ["full report"], [text]
    else:
        names, texts = ["preamble"], [text[: matches[0].start(1)]]
        for i, m in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            names.append(_normalize(m.group(1)))
            texts.append(text[m.end() : end])
    keep = [
        i for i in range(len(names)) if not (names[i] in ("impression", "findings") and not texts[i].strip())
    ]
    names, texts = [names[i] for i in keep], [texts[i] for i in keep]
    if "impression" not in names and "findings" not in names and "\n \n" in texts[-1]:
        first, *rest = texts[-1].split("\n \n")
        texts[-1] = first
        names.append("last_paragraph")
        texts.append("\n \n".join(rest))
    return names, texts


def last_sections(text: str) -> dict[str, str]:
    names, texts = mit_sections(text)
    return dict(zip(names, texts, strict=True))  # later duplicates win, as MIT's "last" rule


def conclusion_section(sections: dict[str, str]) -> str | None:
    for name in ("impression", "findings", "last_paragraph", "comparison"):
        if name in sections:
            return name
    return None


# =========================================================================================================
# Rendering
# =========================================================================================================
@dataclass
class Mention:
    """One finding instance as the patient has it (canonical values)."""

    name: str
    presence: str = "positive"
    location: str | None = None
    level: str | None = None
    type: str | None = None
    change: str | None = None
    raw: str | None = None  # device kind for support devices


@dataclass
class Sentence:
    text: str
    rows: list[Mention] = field(default_factory=list)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    return "an " if word[:1].lower() in "aeiou" else "a "


MASS_HEADS = ("blunting", "elevation of", "enlargement", "widening", "calcification of", "opacification")


def _resolve_articles(text: str, article_ok: dict[str, bool]) -> str:
    """Replace {a}/{a1}/{a2} by a/an (decided by the next word) or nothing for mass and plural nouns."""
    for slot, ok in article_ok.items():
        token = "{" + slot + "}"
        while token in text:
            i = text.index(token)
            nxt = text[i + len(token) :].split(" ", 1)[0]
            text = text[:i] + (_article(nxt) if ok else "") + text[i + len(token) :]
    return text


class Writer:
    """Renders mentions into sentences, recording exactly the attributes each sentence states."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.tube_cm: dict[str, int] = {}  # one position per device in a report

    def np(self, m: Mention, *, allow_level: bool = True) -> tuple[str, Mention, bool, bool]:
        """(noun phrase, the row it states, plural verb?, takes an article?)."""
        rng = self.rng
        form = FINDING_FORMS[m.name]
        lateral_only = any("{lat}" in (f[0] or "") + (f[1] or "") for f in form.forms)
        bilateral = bool(m.location) and m.location.startswith("bilateral")
        plural = bilateral and (form.countable or lateral_only)
        candidates = [(i, f) for i, f in enumerate(form.forms) if f[1 if plural else 0]]
        if not candidates:  # plural-only or singular-only name
            plural = not plural
            candidates = [(i, f) for i, f in enumerate(form.forms) if f[1 if plural else 0]]
        chosen = rng.choices([f for _i, f in candidates], [3 if i == 0 else 1 for i, _f in candidates])[0]
        flags = chosen[2] if len(chosen) > 2 else ""
        name = chosen[1] if plural else chosen[0]
        mass = not form.countable or name.startswith(MASS_HEADS) or "m" in flags
        verb_plural = plural and not name.startswith(MASS_HEADS)
        row = Mention(m.name, m.presence, None, None, None, None, m.raw)
        pre: list[str] = []
        post = ""
        if m.level and allow_level and form.scale and rng.random() < 0.85:
            words = LEVEL_WORDS[form.scale].get(m.level)
            if words:
                pre.append(rng.choice(words))
                row.level = m.level
        if m.type and "t" not in flags and rng.random() < 0.8:
            pre.append(m.type)
            row.type = m.type
        if lateral_only:
            name = name.replace("{lat}", rng.choice(LATERALITY_INSERT[m.location]) if m.location else "")
            row.location = m.location
        elif m.location and rng.random() < 0.92:
            pres, posts = LOCATION_WORDS[m.location]
            if posts and (not pres or rng.random() < 0.3):
                post = " " + rng.choice(posts)
            else:
                pre.append(rng.choice(pres))
            row.location = m.location
        text = " ".join([*pre, name]) + post
        return text, row, verb_plural, not (mass or verb_plural)

    def _fill(self, template: str, np_text: str, plural: bool, article: bool) -> str:
        out = template.replace("{The}", self.rng.choice(["", "The "]))
        out = out.replace("{be}", "are" if plural else "is").replace("{have}", "have" if plural else "has")
        out = _resolve_articles(out.replace("{NP}", np_text), {"a": article})
        return _cap(out)

    def positive(self, m: Mention) -> Sentence:
        rng = self.rng
        if m.name == "support device":
            variants = DEVICES[m.raw]
            change = m.change if m.change in variants else None
            cm = self.tube_cm.setdefault(m.raw, rng.choice([3, 4, 5, 6]))
            text = rng.choice(variants[change]).format(n=cm)
            return Sentence(text, [Mention("support device", "positive", change=change, raw=m.raw)])
        if m.name == "cardiomegaly" and m.level in LEVEL_ADVERBS and rng.random() < 0.4:
            t = rng.choice(CARDIOMEGALY_TEMPLATES)
            change = "unchanged" if "unchanged" in t else None
            text = t.format(adv=LEVEL_ADVERBS[m.level], Level=_cap(LEVEL_WORDS["severity"][m.level][0]))
            return Sentence(text, [Mention("cardiomegaly", "positive", level=m.level, change=change)])
        if m.name == "hyperinflation" and rng.random() < 0.6:
            t = rng.choice(HYPERINFLATION_TEMPLATES)
            return Sentence(
                t, [Mention("hyperinflation", "positive", change="unchanged" if "unch" in t else None)]
            )
        if m.name == "tortuous aorta" and rng.random() < 0.5:
            t = rng.choice(TORTUOUS_TEMPLATES)
            lvl = "mild" if "{adv}" in t else None
            return Sentence(t.format(adv="mildly"), [Mention("tortuous aorta", "positive", level=lvl)])
        change = m.change if m.change in POSITIVE_TEMPLATES else None
        template, allow_level = rng.choice(POSITIVE_TEMPLATES[change])
        text, row, plural, article = self.np(m, allow_level=allow_level)
        row.change = change
        return Sentence(self._fill(template, text, plural, article), [row])

    def resolved(self, m: Mention) -> Sentence:
        text, row, plural, article = self.np(replace(m, level=None))
        row.presence, row.change, row.level = "negative", "resolved", None
        return Sentence(self._fill(self.rng.choice(RESOLVED_TEMPLATES), text, plural, article), [row])

    def pair(self, a: Mention, b: Mention) -> Sentence:
        """Two lateralities of one finding: 'Small left and moderate right pleural effusions.'"""
        left, right = sorted((a, b), key=lambda m: m.location != "left")
        form = FINDING_FORMS[a.name]
        words = LEVEL_WORDS[form.scale]
        t = self.rng.choice(PAIR_TEMPLATES)
        first, second = (left, right) if "{L1} left" in t else (right, left)
        plural = next(f[1] for f in form.forms if f[1])
        text = t.format(
            L1=self.rng.choice(words[first.level]), L2=self.rng.choice(words[second.level]), PLURAL=plural
        )
        rows = [Mention(x.name, "positive", x.location, x.level) for x in (first, second)]
        return Sentence(_cap(text), rows)

    def positive_pair(self, a: Mention, b: Mention) -> Sentence:
        t = self.rng.choice(POSITIVE_PAIR_TEMPLATES)
        t1, r1, p1, a1 = self.np(replace(a, change=None))
        t2, r2, _p2, a2 = self.np(replace(b, change=None))
        text = t.replace("{NP1}", t1).replace("{NP2}", t2).replace("{be1}", "are" if p1 else "is")
        return Sentence(_cap(_resolve_articles(text, {"a1": a1, "a2": a2})), [r1, r2])

    def negatives(self, names: list[str], tail_of: Sentence | None = None) -> Sentence:
        rng = self.rng
        picked = [rng.choice(NEGATIVE_FORMS[n]) for n in names]
        surfaces = [p[0] for p in picked]
        rows = [
            Mention(n, "negative", loc, None, typ) for n, (_surf, typ, loc) in zip(names, picked, strict=True)
        ]
        if tail_of is not None:
            tail = rng.choice(WITHOUT_TEMPLATES[len(names)]).format(*surfaces)
            return Sentence(tail_of.text.rstrip(".") + tail, tail_of.rows + rows)
        return Sentence(rng.choice(NEGATIVE_TEMPLATES[len(names)]).format(*surfaces), rows)

    def uncertain(self, m: Mention) -> Sentence:
        rng = self.rng
        pool = UNCERTAIN_EARLY if m.name == "pneumonia" and rng.random() < 0.5 else UNCERTAIN_TEMPLATES
        text, row, plural, article = self.np(replace(m, change=None))
        row.presence = "uncertain"
        return Sentence(self._fill(rng.choice(pool), text, plural, article), [row])

    def opacity_causes(self, opacity: Mention, causes: list[str]) -> Sentence:
        t = self.rng.choice([x for x in OPACITY_CAUSE_TEMPLATES if x.count("{") - 1 == len(causes)])
        text, row, _plural, _article = self.np(replace(opacity, change=None))
        rows = [row] + [Mention(c, "uncertain") for c in causes]
        return Sentence(_cap(t.format(*causes, OP=text)), rows)


def wrap(text: str, width: int = 79, indent: str = " ") -> list[str]:
    """Greedy wrap at ``width`` characters, each line starting with MIMIC's single space."""
    lines, cur = [], indent
    for word in text.split(" "):
        if not word:
            cur += " "  # keep double spaces between sentences
            continue
        if len(cur) + len(word) > width and cur.strip():
            lines.append(cur.rstrip())
            cur = indent + word
        else:
            cur += word
        cur += " "
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


def join_sentences(rng: random.Random, sentences: list[Sentence]) -> str:
    sep = "  " if rng.random() < 0.6 else " "
    return sep.join(s.text for s in sentences)


# =========================================================================================================
# Patients, studies, clinical course
# =========================================================================================================
# (name, per-study incidence, levels, is_chronic)
ACUTE = [
    ("pleural effusion", 0.15),
    ("atelectasis", 0.15),
    ("lung opacity", 0.12),
    ("consolidation", 0.05),
    ("pneumonia", 0.06),
    ("edema", 0.045),
    ("vascular congestion", 0.03),
    ("pneumothorax", 0.03),
    ("enlarged cardiomediastinum", 0.02),
    ("subcutaneous emphysema", 0.008),
    ("pneumomediastinum", 0.004),
    ("pericardial effusion", 0.006),
    ("heart failure", 0.01),
    ("hilar congestion", 0.006),
    ("lymphadenopathy", 0.005),
    ("mass", 0.004),
    ("lesion", 0.003),
    ("hematoma", 0.003),
    ("blunting of the costophrenic angle", 0.015),
    ("pneumoperitoneum", 0.002),
    ("fracture", 0.006),
    ("aspiration", 0.004),
    ("calcification", 0.006),
    ("infiltrate", 0.02),
]
CHRONIC = [
    ("cardiomegaly", 0.28),
    ("emphysema", 0.06),
    ("hyperinflation", 0.05),
    ("scoliosis", 0.05),
    ("degenerative changes", 0.07),
    ("granuloma", 0.05),
    ("tortuous aorta", 0.08),
    ("aortic calcification", 0.06),
    ("hiatal hernia", 0.04),
    ("fracture", 0.03),
    ("scarring", 0.04),
    ("pleural thickening", 0.03),
    ("elevated hemidiaphragm", 0.04),
    ("nodule", 0.03),
    ("fibrosis", 0.015),
    ("bronchiectasis", 0.015),
    ("interstitial markings", 0.03),
]
ACUTE_NAMES = {n for n, _p in ACUTE}
PARENCHYMAL = {
    "lung opacity",
    "infiltrate",
    "consolidation",
    "atelectasis",
    "pneumonia",
    "edema",
    "nodule",
    "mass",
    "granuloma",
    "fibrosis",
    "scarring",
    "interstitial markings",
    "aspiration",
    "lesion",
    "bronchiectasis",
    "emphysema",
    "vascular congestion",
    "hyperinflation",
}
HEART = {"cardiomegaly", "enlarged cardiomediastinum", "heart failure", "pericardial effusion"}
COMMON_NEGATIVES = [
    "pleural effusion",
    "pneumothorax",
    "consolidation",
    "edema",
    "pneumonia",
    "vascular congestion",
    "lung opacity",
    "atelectasis",
    "fracture",
    "pneumomediastinum",
]
NEG_WEIGHTS = [10, 10, 8, 4, 2, 2, 2, 1, 1, 0.5]


def _draw(rng: random.Random, name: str, *, acute: bool) -> Mention:
    form = FINDING_FORMS[name]
    loc = rng.choice(form.locations)
    typ = rng.choice(form.types)
    if name == "fracture":
        typ = (
            rng.choice([None, "healed", "healed"])
            if not acute
            else rng.choice([None, "acute", "displaced", "nondisplaced"])
        )
    lvl = rng.choice(form.levels) if form.levels else None
    return Mention(name, "positive", loc, lvl, typ)


@dataclass
class Patient:
    subject_id: int
    sex: str
    icu: float
    chronic: list[Mention]
    chronic_devices: list[str]
    acute: dict[tuple[str, str | None], Mention] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)  # ICU device -> studies seen (-1: new)
    n_seen: int = 0


def make_patient(rng: random.Random, subject_id: int) -> Patient:
    chronic = []
    seen: set[str] = set()
    for name, p in CHRONIC:
        if rng.random() < p and name not in seen:
            chronic.append(_draw(rng, name, acute=False))
            seen.add(name)
    devices = [d for d in CHRONIC_DEVICES if rng.random() < DEVICE_INCIDENCE[d]]
    return Patient(subject_id, rng.choice(["man", "woman"]), rng.betavariate(1.2, 2.0), chronic, devices)


def advance(rng: random.Random, pt: Patient, portable: bool) -> tuple[list[Mention], list[Mention]]:
    """Move the patient's course one study on: (current positive mentions, resolved mentions)."""
    prior = pt.n_seen > 0
    resolved: list[Mention] = []
    for key, m in list(pt.acute.items()):
        r = rng.random()
        if r < 0.3:
            del pt.acute[key]
            resolved.append(replace(m, change="resolved", presence="negative"))
            continue
        form = FINDING_FORMS[m.name]
        levels = list(form.levels)
        if m.level and len(levels) > 1:
            i = levels.index(m.level)
            step = rng.choices([-1, 0, 1], [0.25, 0.55, 0.2])[0]
            j = min(max(i + step, 0), len(levels) - 1)
            m.change = "improved" if j < i else "worsened" if j > i else "unchanged"
            m.level = levels[j]
        else:
            m.change = "unchanged"
    scale = 1.6 if portable else 0.8
    for name, p in ACUTE:
        if rng.random() < p * scale:
            m = _draw(rng, name, acute=True)
            key = (m.name, m.location)
            if any(k[0] == m.name for k in pt.acute) or any(c.name == m.name for c in pt.chronic):
                continue
            m.change = "new" if prior else None
            if name == "pleural effusion" and rng.random() < 0.25:  # two lateralities, two instances
                left = replace(m, location="left", level=rng.choice(["mild", "moderate"]), type=None)
                right = replace(
                    m, location="right", level=rng.choice(["minimal", "mild", "severe"]), type=None
                )
                pt.acute[("pleural effusion", "left")] = left
                pt.acute[("pleural effusion", "right")] = right
                continue
            pt.acute[key] = m
    for c in pt.chronic:
        c.change = "unchanged" if prior else None
    # ICU devices come and go with portable studies.
    if portable and pt.icu > 0.3:
        for d in ICU_DEVICES:
            if d in pt.devices:
                if rng.random() < 0.3:
                    del pt.devices[d]
            elif rng.random() < DEVICE_INCIDENCE[d]:
                pt.devices[d] = -1  # placed since the last study
    else:
        pt.devices.clear()
    positives = [replace(c) for c in pt.chronic] + [replace(m) for m in pt.acute.values()]
    devices = [
        Mention(
            "support device",
            "positive",
            change=("unchanged" if prior else None) if d in pt.chronic_devices else None,
            raw=d,
        )
        for d in pt.chronic_devices
    ]
    for d, age in pt.devices.items():
        change = "new" if age < 0 and prior else ("unchanged" if age >= 0 and rng.random() < 0.5 else None)
        devices.append(Mention("support device", "positive", change=change, raw=d))
        pt.devices[d] = age + 1
    pt.n_seen += 1
    if not prior:
        for m in positives:
            m.change = None
    return devices + positives, resolved


# =========================================================================================================
# Report composition
# =========================================================================================================
@dataclass
class Plan:
    rtype: str
    features: set[str]
    has_prior: bool
    portable: bool


class Composer:
    """Builds the body sentences of one report's findings / impression from the patient's mentions."""

    def __init__(
        self, rng: random.Random, positives: list[Mention], resolved: list[Mention], uncertain: Mention | None
    ):
        self.rng = rng
        self.w = Writer(rng)
        self.positives = positives
        self.resolved = resolved
        self.uncertain = uncertain
        # Names never negated in this report: anything present, hedged or resolved somewhere in it.
        self.taken = (
            {m.name for m in positives}
            | {m.name for m in resolved}
            | ({uncertain.name} if uncertain else set())
        )

    def body(self, *, impression: bool) -> list[Sentence]:
        rng, w = self.rng, self.w
        out: list[Sentence] = []
        devices = [m for m in self.positives if m.name == "support device"]
        findings = [m for m in self.positives if m.name != "support device"]
        resolved = self.resolved
        if impression:  # the impression repeats the acute and some chronic findings
            acute = [m for m in findings if m.name in ACUTE_NAMES and m.change != "unchanged"]
            findings = [
                m
                for m in findings
                if m.change in ("new", "worsened", "improved")
                or rng.random() < (0.85 if m.change is None and m.name in ACUTE_NAMES else 0.45)
            ]
            if acute and not any(m.name in ACUTE_NAMES for m in findings):
                findings.append(acute[0])
            devices = [d for d in devices if d.change == "new" or rng.random() < 0.3]
            resolved = [m for m in resolved if rng.random() < 0.6]
        else:
            resolved = [m for m in resolved if rng.random() < 0.7]
        if not impression and rng.random() < 0.1:
            out.append(Sentence(rng.choice(FINDINGS_OPENERS)))
        for d in devices:
            out.append(w.positive(d))
        by_name: dict[str, list[Mention]] = {}
        for m in findings:
            by_name.setdefault(m.name, []).append(m)
        done: set[int] = set()
        for name, ms in by_name.items():  # two lateralities of one finding -> one pair sentence
            if len(ms) == 2 and FINDING_FORMS[name].scale and rng.random() < 0.7:
                out.append(w.pair(ms[0], ms[1]))
                done.update(id(m) for m in ms)
        rest = [m for m in findings if id(m) not in done]
        rng.shuffle(rest)
        rest.sort(key=lambda m: 0 if m.name in PARENCHYMAL else 1 if m.name not in HEART else 2)
        i = 0
        while i < len(rest):
            m = rest[i]
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            if m.name == "lung opacity" and not impression and rng.random() < 0.35:
                causes = [c for c in rng.sample(OPACITY_CAUSES, rng.choice([1, 2])) if c not in self.taken]
                if causes:
                    out.append(w.opacity_causes(m, causes))
                    self.taken.update(causes)
                    i += 1
                    continue
            if (
                nxt is not None
                and m.change is None
                and nxt.change is None
                and m.name != nxt.name
                and rng.random() < 0.25
            ):
                out.append(w.positive_pair(m, nxt))
                i += 2
                continue
            out.append(w.positive(m))
            i += 1
        for m in resolved:
            if m.name not in by_name:
                out.append(w.resolved(m))
        if self.uncertain is not None:
            out.append(w.uncertain(self.uncertain))
        lung_busy = any(n in PARENCHYMAL for n in self.taken)
        heart_busy = any(n in HEART for n in self.taken)
        if impression:
            negs = [n for n in ("pneumothorax", "pleural effusion") if n not in self.taken]
            if negs and rng.random() < 0.35:
                out.append(w.negatives(negs[: rng.choice([1, len(negs)])]))
            if not any(r.presence != "negative" for s in out for r in s.rows):
                out.insert(0, Sentence(rng.choice(NO_ACUTE)))
            elif (
                self.positives and all(m.change == "unchanged" for m in self.positives) and rng.random() < 0.3
            ):
                out.insert(0, Sentence(rng.choice(NO_INTERVAL_CHANGE)))
            return out
        normals: list[Sentence] = []
        negated: set[str] = set()
        if not lung_busy and rng.random() < 0.6:
            t = rng.choice(LUNG_NORMALS)
            normals.append(Sentence(t, [Mention(n, "negative") for n in NORMAL_STATEMENTS[t]]))
            negated.update(NORMAL_STATEMENTS[t])
        if not heart_busy and rng.random() < 0.6:
            t = rng.choice(HEART_NORMALS)
            normals.append(Sentence(t, [Mention(n, "negative") for n in NORMAL_STATEMENTS[t]]))
            negated.update(NORMAL_STATEMENTS[t])
        pool = [
            (n, wt)
            for n, wt in zip(COMMON_NEGATIVES, NEG_WEIGHTS, strict=True)
            if n not in self.taken
            and n not in negated
            and not (n in ("lung opacity", "atelectasis") and lung_busy)
        ]
        k = min(len(pool), rng.choice([0, 1, 2, 2, 3, 3]))
        negs: list[str] = []
        while len(negs) < k:
            n = rng.choices([p[0] for p in pool], [p[1] for p in pool])[0]
            if n not in negs:
                negs.append(n)
        if negs:
            if normals and normals[0].text in LUNG_NORMALS and len(negs) <= 2 and rng.random() < 0.4:
                normals[0] = w.negatives(negs, tail_of=normals[0])
            elif (
                out
                and len(negs) <= 2
                and rng.random() < 0.2
                and out[-1].rows
                and all(r.presence == "positive" and r.change is None for r in out[-1].rows)
                and out[-1].rows[0].name != "support device"
            ):
                out[-1] = w.negatives(negs, tail_of=out[-1])
            else:
                normals.append(w.negatives(negs))
        out += normals
        if rng.random() < 0.3:
            out.append(Sentence(rng.choice(NEUTRAL_SENTENCES)))
        if rng.random() < 0.05:
            out.insert(rng.randrange(len(out) + 1), Sentence(rng.choice(LOOKALIKE_SENTENCES)))
        return out


def _lead(rng: random.Random, s: Sentence) -> Sentence:
    lead = rng.choices(COMPARISON_LEADS, [3, 1, 1])[0]  # MIMIC's portables mostly use the first
    return Sentence(lead + s.text[:1].lower() + s.text[1:], s.rows)


class Layout:
    """Lines of a report plus the helpers that emit headers in MIMIC's styles."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[str] = []

    def banner(self):
        self.lines.append(BANNER)

    def paragraph(self, text: str, blank_before: bool = True):
        if blank_before:
            self.lines.append(" ")
        self.lines += wrap(text)

    def inline(self, header: str, text: str, lead: str = " "):
        sep = self.rng.choice(["  ", "  ", " "])
        lines = wrap(f"{header}:{sep}{text}")
        if lead != " ":
            lines[0] = lead + lines[0][1:]
        self.lines += lines

    def block(self, header: str, paragraphs: list[str], style: str | None = None, lead: str = " "):
        style = style or self.rng.choice(["blank", "blank", "blank", "inline", "newline"])
        if style == "inline" and paragraphs:
            self.inline(header, paragraphs[0], lead)
            for p in paragraphs[1:]:
                self.paragraph(p)
            return
        if style == "newline":  # "HEADER:" then the body on the next line (the \s eats the newline)
            self.lines.append(f"{lead}{header}:")
        else:
            self.lines.append(f"{lead}{header}: ")
            self.lines.append(" ")
        for k, p in enumerate(paragraphs):
            self.paragraph(p, blank_before=k > 0)

    def numbered(self, header: str, items: list[str]):
        self.lines.append(f" {header}: ")
        self.lines.append(" ")
        for k, item in enumerate(items, 1):
            self.lines += wrap(f"{k}.  {item}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def compose_report(
    rng: random.Random, pt: Patient, plan: Plan, positives: list[Mention], resolved: list[Mention]
) -> tuple[str, list[Sentence], set[str]]:
    """(report text, every sentence that carries truth rows, the structural features emitted)."""
    f = plan.features
    emitted: set[str] = set()
    uncertain = None
    if rng.random() < 0.12:
        taken = {m.name for m in positives} | {m.name for m in resolved}
        cand = [
            n
            for n in (
                "pneumonia",
                "atelectasis",
                "pleural effusion",
                "edema",
                "pneumothorax",
                "aspiration",
                "consolidation",
            )
            if n not in taken
        ]
        if cand:
            uncertain = _draw(rng, rng.choice(cand), acute=True)
            if uncertain.level not in ("minimal", "mild"):  # hedged findings are small ones
                uncertain.level = None
    c = Composer(rng, positives, resolved, uncertain)
    lay = Layout(rng)
    sentences: list[Sentence] = []
    indication = rng.choice(INDICATIONS).format(sex=pt.sex)
    exam = "CHEST (PORTABLE AP)" if plan.portable else "CHEST (PA AND LAT)"
    technique = rng.choice(TECHNIQUES["ap" if plan.portable else "pa"])
    comparison = rng.choice(COMPARISONS if plan.has_prior else COMPARISONS_FIRST)
    want: dict[str, list[str]] = {}
    for x in f:
        kind, _, h = x.partition(":")
        if kind in ("alias", "substring", "regex"):
            want.setdefault(_normalize(h), []).append(h)

    def hdr(canon: str, typo_rate: float = 0.02) -> str:
        if want.get(canon):
            return want[canon].pop()
        headers = HEADER_ALIASES[canon]
        return rng.choice(headers) if rng.random() < typo_rate else headers[0]

    def paragraphs(ss: list[Sentence]) -> list[str]:
        if len(ss) > 3 and rng.random() < 0.3:
            k = rng.randrange(1, len(ss))
            return [join_sentences(rng, ss[:k]), join_sentences(rng, ss[k:])]
        return [join_sentences(rng, ss)] if ss else []

    rtype = plan.rtype
    lay.banner()
    if "wet_read" in f:
        wet = c.body(impression=True)[:2]
        lay.lines += wrap(f"WET READ: ___ ___ ___ {rng.choice(['10:32 PM', '3:15 AM', '7:48 PM'])}")
        lay.lines += wrap(" " + join_sentences(rng, wet))
        lay.lines.append(UNDERSCORES)
        lay.banner()
        emitted.add("wet_read")

    if rtype == "E":  # header-less, several paragraphs -> full report + last_paragraph
        lay.lines += wrap(
            rng.choice(
                [
                    "PORTABLE CHEST RADIOGRAPH, ___",
                    "PA AND LATERAL CHEST, ___ AT 10:14",
                    "CHEST RADIOGRAPH PERFORMED ON ___",
                ]
            )
        )
        if rng.random() < 0.5:
            lay.lines += wrap(f"Indication {indication}.")
        body = c.body(impression=False)
        sentences += body
        for p in paragraphs(body) or [rng.choice(NO_ACUTE)]:
            lay.paragraph(p)
        return lay.text(), sentences, emitted
    if rtype == "F":  # no conclusion at all
        if "type:F:notification" in f:
            lay.inline("PROVIDER", "___ ___")
            lay.inline("REASON", indication)
            lay.inline("NOTIFICATION", rng.choice(NOTIFICATIONS))
            emitted.add("F:notification")
        else:
            lay.lines += wrap(rng.choice(NONDIAGNOSTIC))
        return lay.text(), sentences, emitted

    if "empty_title" in f:
        lay.lines.append(" CHEST, PA LATERAL: ")
        emitted.add("empty_title")
    if want.get("examination") or rng.random() < 0.7:
        lay.inline(hdr("examination"), exam)
    for x in sorted(f):
        if x.startswith("unmapped:"):
            lay.inline(x.split(":", 1)[1], rng.choice(["___ ___", indication, "Chest radiograph."]))
    if "ndication" in f:
        lay.inline("NDICATION", indication)
        emitted.add("ndication")
    if want.get("indication") or (rng.random() < 0.75 and "ndication" not in f):
        lay.inline(hdr("indication"), indication)
    if rtype != "D" and (want.get("history") or rng.random() < 0.2):
        lay.inline(hdr("history"), indication)
    if want.get("technique") or (rtype in "AC" and rng.random() < 0.8):
        lay.inline(hdr("technique"), technique)

    if rtype == "D":  # the last section carries the body paragraphs -> last_paragraph
        body = c.body(impression=False)
        sentences += body
        if "type:D:history" in f:
            lay.inline("HISTORY", indication)
            emitted.add("D:history")
        else:
            lay.inline(hdr("comparison"), comparison)
        for p in paragraphs(body) or [rng.choice(NO_ACUTE)]:
            lay.paragraph(p)
        return lay.text(), sentences, emitted
    if rtype == "G":  # comparison is the only conclusion
        lay.inline(hdr("comparison"), comparison)
        lay.inline("NOTIFICATION", rng.choice(NOTIFICATIONS))
        return lay.text(), sentences, emitted

    if want.get("comparison") or rtype in "AC" or rng.random() < 0.6:
        lay.inline(hdr("comparison"), comparison)

    findings = c.body(impression=False) if rtype in "AC" else []
    impression = c.body(impression=True) if rtype in "AB" else []
    if plan.has_prior and ("comparison_lead" in f or rng.random() < (0.6 if rtype == "B" else 0.2)):
        target = impression if rtype == "B" else findings
        if target:
            target[0] = _lead(rng, target[0])
            emitted.add("comparison_lead")
    if impression and ("communication" in f or rng.random() < 0.05):
        impression.append(Sentence(rng.choice(COMMUNICATIONS)))
        emitted.add("communication")
    sentences += findings + impression

    if findings:
        fh = hdr("findings")
        if "dup_findings_empty" in f:
            lay.lines.append(f" {fh}: ")
            emitted.add("dup_findings_empty")
        if "lowercase_header" in f:
            lay.block("Findings", paragraphs(findings), style="blank", lead="")
            emitted.add("lowercase_header")
        elif "swallow" in f and impression:
            # "FINDINGS:\n IMPRESSION: x": the IMPRESSION line becomes the first line of the findings body
            lay.block(fh, [], style="newline")
            lay.inline(hdr("impression"), join_sentences(rng, impression))
            impression = []
            emitted.add("swallow")
        else:
            lay.block(fh, paragraphs(findings))
        if "note_false_header" in f:
            lay.lines += wrap(rng.choice(NOTES))
            emitted.add("note_false_header")
    if impression:
        if "dup_impression" in f:
            lay.block("IMPRESSION", [join_sentences(rng, impression[:1])], style="blank")
            emitted.add("dup_impression")
        ih = hdr("impression")
        lead = "" if "no_leading_space" in f else " "
        if lead == "":
            emitted.add("no_leading_space")
        if lead == " " and ("numbered_impression" in f or (len(impression) >= 2 and rng.random() < 0.2)):
            lay.numbered(ih, [s.text for s in impression])
            emitted.add("numbered_impression")
        else:
            lay.block(ih, paragraphs(impression), lead=lead)
        if "digit_header" in f:
            lay.lines += wrap("ADDENDUM 1:  " + rng.choice(ADDENDA))
            emitted.add("digit_header")
    if want.get("notification") or "notification" in f or rng.random() < 0.03:
        lay.inline(hdr("notification"), rng.choice(NOTIFICATIONS))
        emitted.add("notification")
    if want.get("recommendations") or "recommendations" in f:
        lay.inline(hdr("recommendations"), rng.choice(RECOMMENDATIONS))
        emitted.add("recommendations")
    if want.get("date"):
        lay.inline(hdr("date"), "___")
    if want.get("comment"):
        lay.inline(hdr("comment"), "Portable technique limits evaluation.")
    if want.get("addendum") or "addendum" in f:
        lay.block(hdr("addendum"), [rng.choice(ADDENDA)])
        emitted.add("addendum")
    if want.get("wet read"):
        lay.inline(hdr("wet read"), "___ ___ 10:30 PM  " + rng.choice(NO_ACUTE))
    for canon, left in want.items():  # a header that found no slot in this report type: put it at the end
        for h in left:
            lay.inline(h, "___")
            log.debug("header %s (%s) appended at the end", h, canon)
    return lay.text(), sentences, emitted


# =========================================================================================================
# Truth of one report
# =========================================================================================================
def _norm(s: str) -> str:
    return " ".join(s.split())


def truth_rows(
    text: str, sentences: list[Sentence]
) -> tuple[list[tuple[str, Mention, str]], str | None, dict]:
    """[(section, row, sentence)] for every sentence the parser shows in findings/impression/last_paragraph."""
    secs = last_sections(text)
    out = []
    for section in ("findings", "impression", "last_paragraph"):
        if section not in secs:
            continue
        hay = " " + _norm(secs[section]) + " "
        seen: set[str] = set()
        for s in sentences:
            needle = _norm(s.text)
            if not s.rows or needle in seen:
                continue
            seen.add(needle)
            # a sentence written twice into one parsed section (e.g. an impression merged into the
            # findings) is two mentions
            for _ in range(hay.count(" " + needle)):
                out.extend((section, r, s.text) for r in s.rows)
    return out, conclusion_section(secs), secs


def chexpert_labels(rows: list[tuple[str, Mention, str]], section: str | None) -> dict[str, float | None]:
    labels: dict[str, float | None] = dict.fromkeys(CHEXPERT_LABELS)
    rank = {"positive": 1.0, "uncertain": -1.0, "negative": 0.0}
    order = {1.0: 3, -1.0: 2, 0.0: 1}
    for sec, r, _s in rows:
        if sec != section:
            continue
        label = CHEXPERT_OF.get(r.name)
        if label is None:
            continue
        v = rank[r.presence]
        cur = labels[label]
        if cur is None or order[v] > order[cur]:
            labels[label] = v
    if no_finding(((r.name, r.presence) for sec, r, _s in rows if sec == section), "chexpert"):
        labels["No Finding"] = 1.0
    return labels


# =========================================================================================================
# Corpus
# =========================================================================================================
def _unique_ids(
    rng: random.Random, n: int, low: int, high: int, exclude: set[int], avoid: frozenset[int] = frozenset()
) -> list[int]:
    """``n`` distinct random ids, none in ``exclude`` (ids placed on purpose) nor ``avoid`` (ids that must not
    appear by chance). More draws happen only after a collision with ``avoid``, so corpora without one
    keep their ids."""
    ids = rng.sample(range(low, high), n + len(exclude))
    kept = [i for i in ids if i not in exclude and i not in avoid][:n]
    seen = set(kept)
    while len(kept) < n:
        i = rng.randrange(low, high)
        if i not in exclude and i not in avoid and i not in seen:
            kept.append(i)
            seen.add(i)
    return kept


def _dicom_id(rng: random.Random) -> str:
    h = f"{rng.getrandbits(160):040x}"
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def _gzip_csv(path: Path):
    raw = open(path, "wb")  # noqa: SIM115 - closed with the wrappers in _close
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
    txt = io.TextIOWrapper(gz, encoding="utf-8", newline="")
    return txt, csv.writer(txt, lineterminator="\n"), (txt, gz, raw)


def _close(handles):
    txt, gz, raw = handles
    txt.flush()
    txt.close()
    raw.close()


def _fmt(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def assign_splits(rng: random.Random, counts: list[int]) -> list[str]:
    """Patient-level split with the real study shares (~1.4 % test, ~0.8 % validate), >= 1 patient each
    (given >= 3 patients). Like MIMIC's, the test split prefers patients with several studies."""
    n = sum(counts)
    order = list(range(len(counts)))
    rng.shuffle(order)
    splits = ["train"] * len(counts)
    if len(counts) < 3:
        return splits
    for split, share in (("test", 0.014), ("validate", 0.008)):
        target = max(1, round(n * share))
        free = [i for i in order if splits[i] == "train"]
        if split == "test":
            free.sort(key=lambda i: counts[i] < 3)  # stable: keeps the random order within each group
        got = 0
        for i in free[:-1]:  # leave at least one train patient
            if got >= target:
                break
            if got == 0 or got + counts[i] <= target * 1.1:
                splits[i] = split
                got += counts[i]
    return splits


def study_counts(rng: random.Random, n_studies: int, n_patients: int) -> list[int]:
    """At least one study per patient; the rest skewed (a few patients have many studies, as in MIMIC)."""
    if n_patients < 1 or n_patients > n_studies:
        raise ValueError(f"--patients must be between 1 and --studies ({n_studies}), got {n_patients}")
    weights = [min(rng.paretovariate(1.3), 150.0) for _ in range(n_patients)]  # no patient with 1000s
    counts = [1] * n_patients
    extra = n_studies - n_patients
    if extra:
        total = sum(weights)
        raw = [w / total * extra for w in weights]
        floor = [int(x) for x in raw]
        left = extra - sum(floor)
        rema = sorted(range(n_patients), key=lambda i: raw[i] - floor[i], reverse=True)
        for i in rema[:left]:
            floor[i] += 1
        counts = [c + x for c, x in zip(counts, floor, strict=True)]
    return counts


@dataclass
class Options:
    out: Path
    studies: int
    patients: int
    seed: int = 0
    zip: bool = True
    tree: bool = True
    bad: bool = True
    special: bool = True
    jobs: int = 0  # worker processes; 0 = one per core (inline for small corpora)


@dataclass(frozen=True)
class Override:
    """What the corpus plan fixes for one study (everything else the patient's own RNG draws)."""

    rtype: str | None = None
    features: frozenset[str] = frozenset()
    special: str | None = None  # custom_section_names:... / custom_indices:a:b
    bad: str | None = None  # empty_report / no_report / no_metadata


@dataclass(frozen=True)
class PatientJob:
    seed: int
    subject: int
    split: str
    study_ids: tuple[int, ...]
    overrides: tuple[tuple[int, Override], ...]
    tree: str | None  # the files/ directory when the tree is written (by the worker)


SPRINKLES = [
    ("wet_read", 0.01),
    ("addendum", 0.005),
    ("note_false_header", 0.005),
    ("dup_impression", 0.002),
    ("empty_title", 0.002),
    ("dup_findings_empty", 0.002),
    ("swallow", 0.002),
]


def plan_corpus(opts: Options) -> list[PatientJob]:
    """Ids, study counts, the patient-level split and the studies that must carry a forced feature."""
    rng = random.Random(opts.seed)
    counts = study_counts(rng, opts.studies, opts.patients)
    special = SPECIAL_STUDIES if opts.special and opts.patients >= 20 and opts.studies >= 60 else []
    special_subjects = {s for _st, s, _f, _h in special if s}
    special_study_ids = {st for st, _s, _f, _h in special}
    subjects = sorted(
        _unique_ids(rng, opts.patients - len(special_subjects), 10_000_000, 20_000_000, special_subjects)
        + sorted(special_subjects)
    )
    # A random id that happens to be one of MIT's special studies would get a report without the section
    # MIT's script expects for it (and crash it): only the special studies placed on purpose carry those ids.
    study_ids = _unique_ids(
        rng, opts.studies, 50_000_000, 60_000_000, special_study_ids, MIT_SPECIAL_STUDY_IDS
    )
    splits = assign_splits(rng, counts)
    overrides: dict[tuple[int, int], Override] = {}
    fixed_ids: dict[tuple[int, int], int] = {}
    # MIT's special studies: the named subjects get their study as their last one; ids without a subject
    # go to the first study of train patients.
    for st, subj, feat, _head in special:
        if subj:
            pi = subjects.index(subj)
            key = (pi, counts[pi] - 1)
        else:
            pi = next(
                i
                for i in range(len(subjects))
                if splits[i] == "train" and subjects[i] not in special_subjects and (i, 0) not in overrides
            )
            key = (pi, 0)
        overrides[key] = Override("A", frozenset(), feat)
        fixed_ids[key] = st
    # Forced features and bad inputs on distinct random studies.
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    wanted = len(FORCED_FEATURES) + 3
    free: list[tuple[int, int]] = []
    for g in rng.sample(range(opts.studies), min(opts.studies, wanted + len(overrides))):
        pi = bisect.bisect_right(starts, g) - 1
        key = (pi, g - starts[pi])
        if key not in overrides:
            free.append(key)
    if opts.bad and len(free) > len(FORCED_FEATURES) + 3:
        for reason in ("empty_report", "no_report", "no_metadata"):
            overrides[free.pop()] = Override(bad=reason)
    for (feat, allowed), key in zip(FORCED_FEATURES, free, strict=False):
        rtype = {"type:F:notification": "F", "type:D:history": "D"}.get(feat, allowed[0])
        feats = {feat, "force_prior"} if feat == "comparison_lead" else {feat}
        overrides[key] = Override(rtype, frozenset(feats))
    jobs = []
    it = iter(study_ids)
    for pi, subject in enumerate(subjects):
        ids = tuple(fixed_ids.get((pi, k)) or next(it) for k in range(counts[pi]))
        ov = tuple((k, overrides[(pi, k)]) for k in range(counts[pi]) if (pi, k) in overrides)
        jobs.append(
            PatientJob(
                opts.seed, subject, splits[pi], ids, ov, str(opts.out / "files") if opts.tree else None
            )
        )
    return jobs


@dataclass
class StudyOut:
    subject_id: int
    study_id: int
    rel: str
    text: str | None  # None: no report file (bad input)
    images: list[list]  # metadata rows
    chexpert: list | None
    truth: list[tuple]
    study: tuple


_KIND_NAMES = [k[0] for k in STUDY_KINDS]
_KIND_WEIGHTS = [k[1] for k in STUDY_KINDS]
_PORTABLE_KINDS = [k for k in _KIND_NAMES if "PORT" in k]
_UPRIGHT_KINDS = [k for k in _KIND_NAMES if "PORT" not in k]
_TYPES = list(REPORT_TYPES)
_TYPE_WEIGHTS = list(REPORT_TYPES.values())


def run_patient(job: PatientJob) -> list[StudyOut]:
    """All studies of one patient, in time order; writes their report files when the tree is wanted."""
    subject = job.subject
    prng = random.Random(job.seed * 1_000_003 + subject)
    pt = make_patient(prng, subject)
    overrides = dict(job.overrides)
    day = prng.randrange(0, 365 * 70)  # StudyDate stays within 2105-2199
    pdir = f"files/p{str(subject)[:2]}/p{subject}"
    if job.tree:
        try:
            os.mkdir(f"{job.tree}/p{str(subject)[:2]}/p{subject}")
        except FileNotFoundError:  # first patient of its group folder
            os.makedirs(f"{job.tree}/p{str(subject)[:2]}/p{subject}", exist_ok=True)
        except FileExistsError:
            pass
    out = []
    for k, study_id in enumerate(job.study_ids):
        ov = overrides.get(k, Override())
        portable = prng.random() < 0.15 + 0.7 * pt.icu
        kinds = _PORTABLE_KINDS if portable else _UPRIGHT_KINDS
        kind = prng.choices(kinds, [_KIND_WEIGHTS[_KIND_NAMES.index(x)] for x in kinds])[0]
        if k:
            day += prng.choice([0, 1, 1, 2, 3, 7]) if portable else prng.randrange(3, 500)
            day = min(day, 365 * 94)
        hhmmss = prng.randrange(0, 24) * 10000 + prng.randrange(0, 60) * 100 + prng.randrange(0, 60)
        study_time = round(hhmmss + prng.randrange(0, 1000) / 1000, 3)
        positives, resolved = advance(prng, pt, portable)
        rtype = ov.rtype or prng.choices(_TYPES, _TYPE_WEIGHTS)[0]
        feats = set(ov.features)
        if ov.special:
            feats.add(ov.special)
        if rtype == "A" and not ov.features:
            r = prng.random()
            for name, p in SPRINKLES:
                if r < p:
                    feats.add(name)
                    break
                r -= p
        plan = Plan(rtype, feats, k > 0 or "force_prior" in feats, portable)
        text, sentences, emitted = compose_report(prng, pt, plan, positives, resolved)
        if ov.special and ov.special.startswith("custom_section_names"):
            text = _ensure_special(text, ov.special)
        if ov.special and ov.special.startswith("custom_indices"):
            end = int(ov.special.split(":")[2])
            while len(text) < end + 50:  # MIT slices this study's text at [start, end)
                text += "\n".join(wrap("NOTIFICATION:  " + prng.choice(NOTIFICATIONS))) + "\n"
        if ov.special:
            emitted.add(ov.special)
        if ov.bad == "empty_report":
            text = ""
        rows, concl, _secs = truth_rows(text, sentences) if text else ([], None, {})
        rel = f"{pdir}/s{study_id}.txt"
        has_report = ov.bad != "no_report"
        if has_report and job.tree:  # raw os calls: 227k small files, half the syscalls of open()
            fd = os.open(f"{job.tree}/{rel[6:]}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = memoryview(text.encode("utf-8"))
                while data:
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
        views = prng.choices(*zip(*STUDY_KINDS[_KIND_NAMES.index(kind)][2], strict=True))[0]
        date = _study_date(day)
        images = []
        if ov.bad != "no_metadata":
            for v in views:
                rows_, cols_ = _dims(prng, v, portable)
                orient = "Erect" if not portable else prng.choice(["Erect", "Recumbent", "", "Erect"])
                meaning = VIEW_MEANING[v] if v else prng.choice(["", "postero-anterior"])
                images.append(
                    [
                        _dicom_id(prng),
                        subject,
                        study_id,
                        kind,
                        v,
                        rows_,
                        cols_,
                        date,
                        repr(study_time),
                        kind,
                        meaning,
                        orient,
                    ]
                )
        chexpert = None
        truth = []
        if not ov.bad:
            labels = chexpert_labels(rows, concl)
            chexpert = [subject, study_id, *(_fmt(labels[c]) for c in CHEXPERT_LABELS)]
            truth = [
                (
                    subject,
                    study_id,
                    sec,
                    r.name,
                    r.presence,
                    r.location,
                    r.level,
                    r.type,
                    r.change,
                    r.raw,
                    sent,
                )
                for sec, r, sent in rows
            ]
        headers = [m.group(1) for m in _HEADER.finditer(text)]
        study = (
            subject,
            study_id,
            job.split,
            rtype,
            sorted(emitted),
            headers,
            concl,
            ov.bad,
            0 if ov.bad == "no_metadata" else len(views),
            date,
        )
        out.append(
            StudyOut(subject, study_id, rel, text if has_report else None, images, chexpert, truth, study)
        )
    return out


def _run_chunk(jobs: list[PatientJob]) -> list[list[StudyOut]]:
    return [run_patient(j) for j in jobs]


def _results(jobs: list[PatientJob], workers: int, chunk: int = 64):
    """Patients' results in order; a bounded window of chunks in flight on the worker processes."""
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    if workers <= 1:
        for c in chunks:
            yield from _run_chunk(c)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        pending: deque = deque()
        it = iter(chunks)
        for c in itertools.islice(it, workers * 3):
            pending.append(ex.submit(_run_chunk, c))
        while pending:
            done = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(_run_chunk, nxt))
            yield from done


def generate(opts: Options) -> dict[str, int]:
    """Write the whole corpus; returns counts (studies, images, truth rows, reports)."""
    t0 = time.time()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan_corpus(opts)
    workers = opts.jobs or ((os.cpu_count() or 1) if opts.studies >= 5000 else 1)
    zf = (
        zipfile.ZipFile(out / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=6)
        if opts.zip
        else None
    )
    split_txt, split_csv, split_h = _gzip_csv(out / "mimic-cxr-2.0.0-split.csv.gz")
    meta_txt, meta_csv, meta_h = _gzip_csv(out / "mimic-cxr-2.0.0-metadata.csv.gz")
    chex_txt, chex_csv, chex_h = _gzip_csv(out / "mimic-cxr-2.0.0-chexpert.csv.gz")
    sl_txt, sl_csv, sl_h = _gzip_csv(out / "cxr-study-list.csv.gz")
    rl_txt, rl_csv, rl_h = _gzip_csv(out / "cxr-record-list.csv.gz")
    split_csv.writerow(["dicom_id", "study_id", "subject_id", "split"])
    meta_csv.writerow(METADATA_COLUMNS)
    chex_csv.writerow(["subject_id", "study_id", *CHEXPERT_LABELS])
    sl_csv.writerow(["subject_id", "study_id", "path"])
    rl_csv.writerow(["subject_id", "study_id", "dicom_id", "path"])
    truth_rows_buf: list[tuple] = []
    study_rows_buf: list[tuple] = []
    n_images = n_reports = n_truth = 0

    def flush(writer: TableWriter, buf: list[tuple], force: bool = False):
        if buf and (force or len(buf) >= 50_000):
            cols = list(zip(*buf, strict=True))
            writer.write(
                pa.Table.from_arrays(
                    [pa.array(c, type=f.type) for c, f in zip(cols, writer.schema, strict=True)],
                    schema=writer.schema,
                )
            )
            buf.clear()

    with (
        TableWriter(out / "truth.parquet", SYNTH_TRUTH) as tw,
        TableWriter(out / "truth_studies.parquet", SYNTH_STUDIES) as sw,
    ):
        for studies in tqdm(
            _results(jobs, workers),
            total=len(jobs),
            desc="patients",
            unit="pt",
            disable=len(jobs) < 5000,
            mininterval=2,
        ):
            for so in studies:
                if so.text is not None:
                    if zf is not None:
                        zi = zipfile.ZipInfo(so.rel, date_time=(2019, 9, 17, 0, 0, 0))
                        zi.compress_type = zipfile.ZIP_DEFLATED
                        zi.external_attr = 0o644 << 16
                        zf.writestr(zi, so.text)
                    sl_csv.writerow([so.subject_id, so.study_id, so.rel])
                    n_reports += 1
                split = so.study[2]
                for img in so.images:
                    split_csv.writerow([img[0], so.study_id, so.subject_id, split])
                    meta_csv.writerow(img)
                    rl_csv.writerow([so.subject_id, so.study_id, img[0], f"{so.rel[:-4]}/{img[0]}.dcm"])
                n_images += len(so.images)
                if so.chexpert is not None:
                    chex_csv.writerow(so.chexpert)
                truth_rows_buf += so.truth
                n_truth += len(so.truth)
                study_rows_buf.append(so.study)
            flush(tw, truth_rows_buf)
            flush(sw, study_rows_buf)
        flush(tw, truth_rows_buf, force=True)
        flush(sw, study_rows_buf, force=True)
    for h in (split_h, meta_h, chex_h, sl_h, rl_h):
        _close(h)
    if opts.tree:
        _distractors(out, [j.subject for j in jobs])
    if zf is not None:
        zf.close()
    stats = {
        "studies": opts.studies,
        "patients": len(jobs),
        "reports": n_reports,
        "images": n_images,
        "truth_rows": n_truth,
        "seconds": round(time.time() - t0, 1),
    }
    log.info("synth: %s", stats)
    return stats


def _ensure_special(text: str, feature: str) -> str:
    """custom_section_names studies must contain the named section (MIT's script raises otherwise)."""
    name = feature.split(":", 1)[1]
    names, _texts = mit_sections(text)
    if name in names:
        return text
    header = {
        "recommendations": "RECOMMENDATION(S)",
        "examination": "EXAMINATION",
        "technique": "TECHNIQUE",
        "indication": "INDICATION",
        "note": "NOTE",
        "history": "HISTORY",
    }[name]
    body = {
        "note": "Dr. ___ was informed of these results at 10:45 AM.",
        "recommendations": RECOMMENDATIONS[0],
    }.get(name, "___")
    return text + f" {header}:  {body}\n"


def _study_date(day: int) -> str:
    d = dt.date(2105, 1, 1) + dt.timedelta(days=day)
    return d.strftime("%Y%m%d")


def _dims(rng: random.Random, view: str, portable: bool) -> tuple[int, int]:
    if portable:
        return rng.choice([(2544, 3056), (3056, 2544), (2539, 3050), (3050, 2539), (2022, 2022)])
    if view in ("LATERAL", "LL"):
        return rng.choice([(3056, 2544), (2544, 3056), (3056, 2544)])
    return rng.choice([(3056, 2544), (3050, 2539), (2544, 3056)])


def _distractors(out: Path, subjects: list[int]) -> None:
    """Things in the tree every reader must ignore (reference §2.5)."""
    files = out / "files"
    (files / "README").write_text("Synthetic MIMIC-CXR-style reports (not real patient data).\n")
    (files / "p1").mkdir(exist_ok=True)
    (files / "p1" / "s50000000.txt").write_text(" not a report: group folder name is not 3 characters\n")
    (files / "x10").mkdir(exist_ok=True)
    (files / "x10" / "s50000001.txt").write_text(" not a report: group folder does not start with p\n")
    first = subjects[0]
    pdir = files / f"p{str(first)[:2]}" / f"p{first}"
    if pdir.exists():
        (pdir / "notes.md").write_text("not a report\n")
        (pdir / "s50000002.txt.bak").write_text(" backup, not a report\n")
        studies = sorted(p for p in pdir.glob("s*.txt"))
        if studies:
            img = pdir / studies[0].stem
            img.mkdir(exist_ok=True)
            (img / "0000000a-0000000b-0000000c-0000000d-0000000e.dcm").write_bytes(b"DICM placeholder")
    grp = files / f"p{str(first)[:2]}"
    odd = grp / f"x{first}"
    odd.mkdir(exist_ok=True)
    (odd / "s50000003.txt").write_text(" not a report: patient folder does not start with p\n")


def main(argv: list[str] | None = None) -> None:
    p = cli_parser("Write a synthetic MIMIC-CXR-layout corpus with the truth of every report.")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--studies", type=int, default=300)
    p.add_argument("--patients", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--zip", action=argparse.BooleanOptionalAction, default=True, help="write mimic-cxr-reports.zip"
    )
    p.add_argument(
        "--tree", action=argparse.BooleanOptionalAction, default=True, help="write the files/ tree"
    )
    p.add_argument(
        "--bad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include an empty report, a study without report and a report without metadata",
    )
    p.add_argument(
        "--special-ids",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse a few of MIT's special-cased study ids",
    )
    p.add_argument("--jobs", type=int, default=0, help="worker processes (0 = one per core)")
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    generate(Options(a.out, a.studies, a.patients, a.seed, a.zip, a.tree, a.bad, a.special_ids, a.jobs))


if __name__ == "__main__":
    main()
