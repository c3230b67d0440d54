"""Location phrases for the question text ("left basal" -> "the left lung base") and laterality flips."""

from __future__ import annotations

_STRUCTURE_PLURAL = {
    "lung": "lungs",
    "lobe": "lobes",
    "lingula": "lingula",
    "hemithorax": "hemithoraces",
    "costophrenic angle": "costophrenic angles",
    "hemidiaphragm": "hemidiaphragms",
    "fissure": "fissures",
    "hilum": "hila",
    "mediastinum": "mediastinum",
    "rib": "ribs",
    "clavicle": "clavicles",
    "spine": "spine",
    "chest wall": "chest walls",
}
_LATERALITIES = ("left", "right", "bilateral")
_ZONES = {
    "upper",
    "middle",
    "lower",
    "apical",
    "basal",
    "perihilar",
    "retrocardiac",
    "lateral",
    "medial",
    "peripheral",
    "central",
    "mid",
}
_ZONE_NOUN = {  # zones that name a place on their own: (singular, plural)
    "basal": ("lung base", "lung bases"),
    "apical": ("lung apex", "lung apices"),
    "perihilar": ("perihilar region", "perihilar regions"),
    "retrocardiac": ("retrocardiac region", "retrocardiac region"),
}


def location_phrase(location: str) -> str:
    """A readable noun phrase for a canonical location (laterality zone structure tokens).

    "left lower lobe" -> "the left lower lobe", "left basal" -> "the left lung base",
    "bilateral" -> "both lungs", "retrocardiac" -> "the retrocardiac region".
    """
    loc = " ".join(location.split())
    structure = next((s for s in _STRUCTURE_PLURAL if loc == s or loc.endswith(" " + s)), None)
    toks = (loc[: -len(structure)] if structure else loc).split()
    lat = toks[0] if toks and toks[0] in _LATERALITIES else None
    zones = toks[1:] if lat else toks
    if (not zones and not lat and not structure) or any(z not in _ZONES for z in zones):
        return f"the {loc} region"
    if structure == "lung" and any(z in _ZONE_NOUN for z in zones):
        structure = None  # "right basal lung" is the right lung base
    noun_zone = None if structure else next((z for z in reversed(zones) if z in _ZONE_NOUN), None)
    adjectives = [z for z in zones if z != noun_zone]
    if structure:
        singular, plural = structure, _STRUCTURE_PLURAL[structure]
    elif noun_zone:
        singular, plural = _ZONE_NOUN[noun_zone]
    else:
        singular, plural = "lung", "lungs"
    if lat == "bilateral":
        if plural == singular:
            return " ".join(["the bilateral", *adjectives, singular])
        return " ".join(["both", *adjectives, plural])
    # no laterality and no named structure ("basal", "upper"): both sides are meant
    noun = singular if (lat or structure) else plural
    return " ".join(["the", *([lat] if lat else []), *adjectives, noun])


def flip_laterality(location: str) -> str | None:
    toks = location.split(" ", 1)
    swap = {"left": "right", "right": "left"}.get(toks[0])
    return None if swap is None else " ".join([swap, *toks[1:]])


def with_other_sides(locations: list[str]) -> list[str]:
    """``locations`` followed by the other side of every one-sided location not already among them.

    A presence "no" question may move a finding to the other side ("left basal" -> "right basal"): the
    moved location needs a code even when no finding of the corpus is seen there.
    """
    out = list(locations)
    known = set(out)
    for loc in locations:
        other = flip_laterality(loc)
        if other is not None and other not in known:
            known.add(other)
            out.append(other)
    return out
