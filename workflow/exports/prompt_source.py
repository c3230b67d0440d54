"""Where the RaDialog files' report-generation instruction and system message come from.

RaDialog's evaluation (``test.py``) and demo (``demo.py``) rebuild their prompts from the RaDialog
checkout itself: the instruction is the value of a key of ``vicuna_prompts.json`` (``test.py --prompt``,
README: ``img_matching_examples_ig2_noexamples_IMG_findings``; one string with a ``{findings}`` slot for
the structured findings, the 32 ``<IMG>`` tokens written into it), and the system message is the
``system=`` string of the ``Conversation(...)`` built in ``test.py`` (``demo.py`` if there is no
``test.py``). A model trained on other wording is evaluated on prompts it never saw.

RaDialog has no licence, so the project ships only its own paraphrases (``libs/radialog_prompts.yaml``,
the fallback). With ``exports.radialog.prompts_from`` (the user's checkout folder, or a
``vicuna_prompts.json``-style file) the two strings are read from the user's copy at build time and
never stored in the project. A file may carry the system message under a ``"system"`` key; otherwise it
is read from ``test.py`` / ``demo.py`` next to the file. The scripts are parsed (``ast``), never run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path

CONFIG_KEY = "exports.radialog.prompts_from"
PROMPTS_FILE = "vicuna_prompts.json"
DEFAULT_PROMPT_KEY = "img_matching_examples_ig2_noexamples_IMG_findings"
SYSTEM_KEY = "system"
SYSTEM_SCRIPTS = ("test.py", "demo.py")  # the evaluation first: that is the wording a model is scored on


class PromptSourceError(ValueError):
    """``exports.radialog.prompts_from`` cannot supply the prompts (the message names the key)."""


@dataclass(frozen=True)
class ExternalPrompts:
    """RaDialog's own instruction (split at its ``{findings}`` slot) and system message."""

    parts: tuple[str, ...]  # literal text around the slots, str.format escapes already undone
    system: str
    description: str  # which files and key, for the log and summary.json (never the text itself)

    def instruction(self, findings: str) -> str:
        """The instruction with the structured findings filled in, as RaDialog's ``.format`` does."""
        return findings.join(self.parts)

    def digest(self) -> str:
        """sha256 of the two strings: which wording a build used, without storing it."""
        return hashlib.sha256(json.dumps([self.parts, self.system]).encode("utf-8")).hexdigest()


def _fail(what: str) -> PromptSourceError:
    return PromptSourceError(f"`{CONFIG_KEY}`: {what}")


def _split_template(text: str, where: str) -> tuple[str, ...]:
    """Literal parts of a ``str.format`` template whose only field is ``{findings}``."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise _fail(f"{where} is not a format string with a {{findings}} slot ({exc})") from None
    parts, current = [], ""
    for literal, name, spec, conversion in fields:
        current += literal
        if name is None:
            continue
        if name != "findings" or spec or conversion:
            raise _fail(f"{where} has the slot {{{name}}}; only {{findings}} is filled")
        parts.append(current)
        current = ""
    parts.append(current)
    if len(parts) < 2:
        raise _fail(f"{where} has no {{findings}} slot for the structured findings")
    return tuple(parts)


def system_from_script(path: Path) -> str | None:
    """The ``system=`` string literal of the first ``Conversation(...)`` call in a Python file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    calls = sorted(
        (n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset)
    )
    for node in calls:  # in source order: "first" means the first one written
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name != "Conversation":
            continue
        for kw in node.keywords:
            if kw.arg == "system":
                try:
                    value = ast.literal_eval(kw.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):  # not a literal: look further
                    continue
                if isinstance(value, str) and value.strip():
                    return value
    return None


def load(path: str | Path, prompt_key: str = DEFAULT_PROMPT_KEY) -> ExternalPrompts:
    """Read and validate the user's RaDialog prompts (see the module docstring)."""
    given = Path(path)
    if given.is_dir():
        prompts_file = given / PROMPTS_FILE
        if not prompts_file.is_file():
            raise _fail(f"{str(given)!r} is a folder without {PROMPTS_FILE} (give the RaDialog checkout)")
    elif given.is_file():
        prompts_file = given
    else:
        raise _fail(f"{str(given)!r} does not exist (give the RaDialog checkout or its {PROMPTS_FILE})")
    try:
        data = json.loads(prompts_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{prompts_file.name} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(f"{prompts_file.name} is not a JSON object of prompt keys")
    missing = [key for key in (prompt_key,) if not isinstance(data.get(key), str) or not data[key].strip()]
    if missing:
        raise _fail(
            f"{prompts_file.name} lacks the prompt keys {', '.join(missing)} (has: "
            f"{', '.join(sorted(k for k in data if isinstance(data[k], str))) or 'none'}); "
            "set exports.radialog.prompt_key to the key test.py --prompt uses"
        )
    parts = _split_template(data[prompt_key], f"{prompts_file.name}[{prompt_key}]")
    if isinstance(data.get(SYSTEM_KEY), str) and data[SYSTEM_KEY].strip():
        system, system_from = data[SYSTEM_KEY], f"{prompts_file.name}[{SYSTEM_KEY}]"
    else:
        system = system_from = None
        for script in SYSTEM_SCRIPTS:
            system = system_from_script(prompts_file.parent / script)
            if system is not None:
                system_from = script
                break
        if system is None:
            raise _fail(
                f"no system message: {prompts_file.name} lacks the key {SYSTEM_KEY!r} and there is no "
                f"{' / '.join(SYSTEM_SCRIPTS)} with a Conversation(system=...) next to it"
            )
    description = f"RaDialog checkout: {prompts_file.name}[{prompt_key}], system message from {system_from}"
    return ExternalPrompts(parts, system, description)


def source_files(source: str | Path | None) -> list[str]:
    """The existing files a configured source can be read from (rule inputs: a change rebuilds)."""
    if not source:
        return []
    given = Path(source)
    folder = given if given.is_dir() else given.parent
    candidates = [folder / PROMPTS_FILE if given.is_dir() else given, *(folder / s for s in SYSTEM_SCRIPTS)]
    return [str(f) for f in candidates if f.is_file()]


def config_problems(config: dict, cwd: str | Path = ".") -> list[str]:
    """Start-up check (workflow/configcheck.py): the configured source loads."""
    radialog = (config.get("exports") or {}).get("radialog") or {}
    source = radialog.get("prompts_from")
    if source is None:
        return []
    path = Path(source)
    try:
        load(
            path if path.is_absolute() else Path(cwd) / path, radialog.get("prompt_key") or DEFAULT_PROMPT_KEY
        )
    except PromptSourceError as exc:
        return [str(exc)]
    return []
