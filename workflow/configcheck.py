"""Start-up checks of the configuration that its JSON schema (config.schema.yaml) cannot express.

The schema rejects unknown keys, misspelt fields and empty strings; this module checks what needs the
file system or crosses sections: configured files that must exist, an output folder that would be
the working directory itself, and LLM stages naming an endpoint that is not configured. Every error
names the config key. Run from rules/common.smk right after ``validate``, in the working directory
Snakemake runs in (paths are relative to it, or else to the workflow's own folder).
"""

from __future__ import annotations

from pathlib import Path

from workflow.exports import prompt_source

# (key path, what the file is) of configured files that must exist when set (null = not used).
FILE_KEYS = (
    (("vqa", "names"), "the findings lib with name,vqa_name columns"),
    (("vqa", "templates"), "the VQA question templates"),
    (("llm", "gold", "exclude"), "the file of study ids never to put in the gold set"),
)


class ConfigError(ValueError):
    """A configuration problem found at start-up (the message names the key)."""


def _get(config: dict, path: tuple[str, ...]):
    value = config
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def problems(config: dict, cwd: str | Path = ".", shipped: str | Path | None = None) -> list[str]:
    """Every problem found, one message per key. A relative file path is looked up in ``cwd`` and then in
    ``shipped`` (the workflow's own folder: the defaults name files the workflow ships, rules/common.smk
    ``config_path``)."""
    cwd = Path(cwd)
    found = []
    for path, what in FILE_KEYS:
        value = _get(config, path)
        exists = value is not None and (
            (cwd / value).is_file() or (shipped is not None and (Path(shipped) / value).is_file())
        )
        if value is not None and not exists:
            found.append(f"`{'.'.join(path)}` points to {value!r} ({what}), which is not a file")
    outdir = config.get("outdir")
    if isinstance(outdir, str) and outdir.strip() and (cwd / outdir).resolve() == cwd.resolve():
        found.append(
            f"`outdir` is {outdir!r}, the working directory itself: stage folders would land next to the "
            "Snakefile; name a folder (default: results)"
        )
    found.extend(prompt_source.config_problems(config, cwd))
    llm = config.get("llm") or {}
    endpoints = llm.get("endpoints") or {}
    stages = (
        [("llm", stage, "endpoint") for stage in ("gold", "keyinfo", "followup")]
        if llm.get("backend") == "llm"
        else []
    )
    if llm.get("backend") == "llm":
        stages.append(("exports", "radialog", "llm", "endpoint"))
    if _get(config, ("rg4", "rewriter")) == "llm":
        stages.append(("rg4", "llm", "endpoint"))
    for path in stages:
        name = _get(config, path)
        if name is not None and name not in endpoints:
            found.append(
                f"`{'.'.join(path)}` names the endpoint {name!r}, which is not in llm.endpoints "
                f"({', '.join(sorted(endpoints)) or 'none configured'})"
            )
    return found


def check(config: dict, cwd: str | Path = ".", shipped: str | Path | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem (nothing when the configuration is fine)."""
    found = problems(config, cwd, shipped)
    if found:
        raise ConfigError("config: " + "; ".join(found))
