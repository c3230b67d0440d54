"""Fail fast: one cheap call to an endpoint before a stage sends its requests.

``GET <base>/models`` (``<azure_endpoint>/openai/models?api-version=...`` on Azure) checks in well under
a second that something listens at the configured URL and accepts the key; without it, a wrong URL or
key shows up only after every request has exhausted its retries. A failure names the URL, the HTTP
status and the config key to fix (for a rejected key: the environment variable's NAME, never its
value). Each endpoint is probed once per process (one LLM rule = one process).
"""

from __future__ import annotations

import logging

from workflow.llm.run import FatalEndpointError, make_client

log = logging.getLogger(__name__)
_probed: set[tuple] = set()


class EndpointProbeError(FatalEndpointError):
    """The endpoint cannot answer: nothing listens, it refuses the key, or the URL is wrong."""


def _where(cfg: dict) -> tuple[str, str]:
    """(the URL probed, the config key that sets it)."""
    name, endpoint = cfg["endpoint_name"], cfg["endpoint"]
    if endpoint.get("kind") == "azure":
        return f"{endpoint.get('azure_endpoint')}/openai/models", f"llm.endpoints.{name}.azure_endpoint"
    return f"{str(endpoint.get('base_url') or '').rstrip('/')}/models", f"llm.endpoints.{name}.base_url"


def probe(cfg: dict) -> None:
    """Raise :class:`EndpointProbeError` unless the stage's endpoint answers ``/models`` with 200."""
    import openai

    if cfg["executor"] == "vllm":  # offline: no server to ask
        return
    endpoint, name = cfg["endpoint"], cfg["endpoint_name"]
    memo = (
        name,
        endpoint.get("kind"),
        endpoint.get("base_url"),
        endpoint.get("azure_endpoint"),
        endpoint.get("api_key_env"),
    )
    if memo in _probed:
        return
    url, url_key = _where(cfg)
    timeout = float(cfg.get("probe_timeout_s") or 10.0)
    client = make_client({**cfg, "timeout_s": timeout}, asynchronous=False)
    try:
        client.models.list()
    except openai.APITimeoutError:
        raise EndpointProbeError(
            f"llm endpoint {name!r}: no answer from {url} within {timeout:g} s; check {url_key} "
            "(and that the server is up)"
        ) from None
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise EndpointProbeError(
            f"llm endpoint {name!r}: nothing answers at {url} ({type(cause).__name__}: {cause}); "
            f"fix {url_key} or start the server"
        ) from None
    except openai.APIStatusError as exc:
        status = exc.status_code
        if status in (401, 403):
            env = endpoint.get("api_key_env")
            fix = (
                f"the key in ${env} (llm.endpoints.{name}.api_key_env) is not accepted"
                if env
                else f"it wants a key: set llm.endpoints.{name}.api_key_env to the NAME of the variable holding it"
            )
            raise EndpointProbeError(f"llm endpoint {name!r}: HTTP {status} from {url}: {fix}") from None
        raise EndpointProbeError(
            f"llm endpoint {name!r}: HTTP {status} from {url}; check {url_key}"
            + (f" and llm.endpoints.{name}.api_version" if endpoint.get("kind") == "azure" else "")
        ) from None
    finally:
        client.close()
    _probed.add(memo)
    log.info("llm endpoint %r answers at %s", name, url)
