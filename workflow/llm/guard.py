"""Refuse to send a credentialed corpus (MIMIC-CXR, PhysioNet DUA) to a public third-party endpoint.

Allowed without opt-in: Azure OpenAI (``*.openai.azure.com``, ``*.cognitiveservices.azure.com``,
``*.services.ai.azure.com``), loopback and private-network hosts (your own vLLM / LLaMA-Factory server),
and executors that send nothing (``vllm`` offline, ``rules``). Anything else (api.openai.com, other
hosted APIs) needs ``llm.allow_public_endpoint: true``, a deliberate statement that the data's licence
allows it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

AZURE_SUFFIXES = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
LOCAL_NAMES = {"localhost", "localhost.localdomain"}


class GuardError(RuntimeError):
    pass


def endpoint_url(endpoint: dict) -> str | None:
    if endpoint.get("kind") == "azure":
        return endpoint.get("azure_endpoint")
    return endpoint.get("base_url") or "https://api.openai.com/v1"


def classify(url: str | None) -> str:
    """``azure``, ``local`` or ``public`` for an endpoint URL."""
    host = (urlparse(url or "").hostname or "").lower()
    if any(host.endswith(s) for s in AZURE_SUFFIXES):
        return "azure"
    if host in LOCAL_NAMES or host.endswith(".local") or "." not in host and host:
        return "local"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "public"
    return "local" if (ip.is_loopback or ip.is_private or ip.is_link_local) else "public"


def check(endpoint: dict, executor: str, credentialed: bool, allow_public: bool) -> str:
    """Raise :class:`GuardError` when a credentialed corpus would go to a public endpoint."""
    if executor in ("vllm", "rules"):
        return "local"
    if not endpoint_url(endpoint):
        raise ValueError("config: the llm endpoint has no URL (set azure_endpoint for kind: azure)")
    kind = classify(endpoint_url(endpoint))
    if kind == "public" and credentialed and not allow_public:
        raise GuardError(
            f"refusing to send a credentialed corpus (corpus.credentialed: true) to the public endpoint "
            f"{urlparse(endpoint_url(endpoint)).hostname!r}: the PhysioNet DUA forbids third-party APIs. "
            "Use Azure OpenAI or a local server, or set llm.allow_public_endpoint: true if the data's "
            "licence allows it."
        )
    return kind
