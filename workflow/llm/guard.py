"""Refuse to send a credentialed corpus (MIMIC-CXR, PhysioNet DUA) anywhere it may not go.

Allowed without opt-in: Azure OpenAI (``*.openai.azure.com``, ``*.cognitiveservices.azure.com``,
``*.services.ai.azure.com``), hosts on loopback or private networks (your own vLLM / LLaMA-Factory
server), and executors that send nothing over HTTP (``vllm`` offline, ``rules``). Anything else
(api.openai.com, other hosted APIs) needs ``llm.allow_public_endpoint: true``, a deliberate statement
that the data's licence allows it.

How a host is judged — the way the HTTP client will reach it, so no spelling gets around the guard:

- the URL is parsed by the SDK's own HTTP library (``httpx2``), so userinfo and backslash tricks
  yield the host the client connects to;
- an IP literal in any form the C resolver accepts (dotted, ``127.1``, a decimal / hex / octal
  integer such as ``1746011840``, ``0x7f000001``, IPv6 incl. IPv4-mapped ``::ffff:a.b.c.d``) is
  read as that address; any other name is resolved (``getaddrinfo``, as the client does) and is local
  only if every address it resolves to is;
- local means loopback (127.0.0.0/8, ::1) or a private range (10/8, 172.16/12, 192.168/16,
  fc00::/7). Link-local (169.254/16 holds cloud metadata services), shared CGNAT space, the
  unspecified address and names that do not resolve are not local.

A proxy from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` that the client would use for the
endpoint (``NO_PROXY`` honoured exactly as the client honours it) means report text goes to the proxy
(in cleartext for ``http://``): for a credentialed corpus this is refused unless the endpoint is in
``NO_PROXY`` or ``llm.allow_proxy: true`` states that the proxy is trusted.

``corpus.credentialed: false`` is not taken on trust either: a corpus that looks like MIMIC-CXR (its
layout, PhysioNet file names, MIMIC id ranges) needs ``corpus.confirm_not_credentialed: true`` as well
(:func:`check_corpus`, run at start-up), and the log says so.
"""

from __future__ import annotations

import csv
import gzip
import ipaddress
import logging
import os
import re
import shlex
import socket
from pathlib import Path

log = logging.getLogger(__name__)

AZURE_SUFFIXES = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7")
)
# Characters of an IPv4 literal in any of inet_aton's forms (dotted parts, decimal/hex/octal numbers).
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")
# Programs whose whole point is reaching another machine: a vLLM command starting with one is remote.
REMOTE_PROGRAMS = {
    "ssh",
    "scp",
    "sftp",
    "rsync",
    "mosh",
    "autossh",
    "curl",
    "wget",
    "nc",
    "ncat",
    "netcat",
    "socat",
    "telnet",
    "kubectl",
    "gcloud",
}
HOST_OPTIONS = ("--host", "--hostname", "--server", "--remote")
MIMIC_SUBJECTS = range(10_000_000, 20_000_000)
MIMIC_STUDIES = range(50_000_000, 60_000_000)


class GuardError(RuntimeError):
    pass


def endpoint_url(endpoint: dict) -> str | None:
    if endpoint.get("kind") == "azure":
        return endpoint.get("azure_endpoint")
    return endpoint.get("base_url") or "https://api.openai.com/v1"


def client_url(endpoint: dict) -> str | None:
    """The URL the openai SDK will really use for ``endpoint``: like the SDK, an unset URL falls back on
    ``OPENAI_BASE_URL`` / ``AZURE_OPENAI_ENDPOINT`` (then, for kind openai, on api.openai.com)."""
    if endpoint.get("kind") == "azure":
        return endpoint.get("azure_endpoint") or os.environ.get("AZURE_OPENAI_ENDPOINT") or None
    return endpoint.get("base_url") or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"


def host_of(url: str) -> str:
    """The host the HTTP client connects to for ``url`` ('' when it cannot parse the URL)."""
    import httpx2

    try:
        return httpx2.URL(url).host
    except (httpx2.InvalidURL, TypeError, ValueError):
        return ""


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP literal stands for, in every form the resolver accepts; None for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id does not change the address
    except ValueError:
        ip = None
        if _NUMERIC_HOST.fullmatch(host):
            try:  # 1746011840, 0x7f000001, 017700000001, 127.1, 0x7f.1: what getaddrinfo reads them as
                ip = ipaddress.IPv4Address(socket.inet_aton(host))
            except OSError:
                ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def is_local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in LOCAL_NETWORKS)


def _resolves_locally(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # a name that does not resolve is not known to be local
    addresses = {ip_literal(info[4][0]) for info in infos}
    return bool(addresses) and None not in addresses and all(is_local_address(a) for a in addresses)


def classify(url: str | None) -> str:
    """``azure``, ``local`` or ``public`` for an endpoint URL."""
    host = host_of(url or "").lower()
    if not host:
        return "public"
    ip = ip_literal(host)
    if ip is not None:
        return "local" if is_local_address(ip) else "public"
    if any(host.endswith(s) for s in AZURE_SUFFIXES):
        return "azure"
    return "local" if _resolves_locally(host) else "public"


def proxy_for(url: str) -> str | None:
    """The proxy URL the SDK's HTTP client would send a request for ``url`` through (None: direct).

    Uses the client library's own reading of the environment (``HTTP(S)_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY``) and its own pattern matching and precedence.
    """
    import httpx2
    from httpx2._utils import URLPattern, get_environment_proxies

    try:
        target = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError, ValueError):
        return None
    patterns = sorted((URLPattern(key), proxy) for key, proxy in get_environment_proxies().items())
    for pattern, proxy in patterns:
        if pattern.matches(target):
            return proxy
    return None


def _redact(proxy: str) -> str:
    """A proxy URL without its credentials (they must never reach a log or an error message)."""
    return re.sub(r"//[^/@]*@", "//***@", proxy)


def _words(argv: list[str]) -> list[tuple[int, str, bool]]:
    """(argument index, word, in command position) of a command line, shell snippets split into words."""
    out = []
    wrappers = {"env", "nice", "nohup", "time", "stdbuf", "ionice", "exec"}
    expect_program = True
    for i, arg in enumerate(argv):
        if " " in arg:  # a shell snippet (bash -c "ssh host ..."): every word of it may be a program
            try:
                pieces = shlex.split(arg)
            except ValueError:
                pieces = arg.split()
            out += [(i, w, True) for w in pieces]
            continue
        program = expect_program and not arg.startswith("-") and "=" not in arg
        out.append((i, arg, program))
        if program:
            expect_program = Path(arg).name in wrappers
    return out


def check_command(command: list | None) -> None:
    """Refuse an offline-executor command that would run (or send the requests) on another host."""
    if not command:
        return
    argv = [str(part) for part in command]
    words = _words(argv)
    why = None
    for n, (i, word, program) in enumerate(words):
        if program and Path(word).name in REMOTE_PROGRAMS:
            why = f"argument {i} runs {Path(word).name!r}, which reaches another machine"
        for url in re.findall(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"']+", word):
            if not why and not url.lower().startswith("file:") and classify(url) != "local":
                why = f"argument {i} names the remote host {host_of(url) or url!r}"
        key, eq, value = word.partition("=")
        if key in HOST_OPTIONS:
            host = value if eq else (words[n + 1][1] if n + 1 < len(words) else "")
            if host and not why and classify(f"http://{host}/") != "local":
                why = f"argument {i} names the remote host {host!r}"
        if why:
            raise GuardError(
                f"refusing llm.vllm.command: {why}. The offline executor must run on this machine (it is "
                "given the request files, report text included); run vLLM here, or serve it on a private "
                "network and use executor: openai with its base_url (llm.allow_public_endpoint: true "
                "lifts this check when the data's licence allows the data to leave)."
            )


def check(
    endpoint: dict,
    executor: str,
    credentialed: bool,
    allow_public: bool,
    *,
    allow_proxy: bool = False,
    vllm_command: list | None = None,
) -> str:
    """Raise :class:`GuardError` when a credentialed corpus would leave for somewhere it may not go."""
    if executor == "rules":
        return "local"
    if executor == "vllm":
        if credentialed and not allow_public:  # the opt-in that lets the data leave covers this too
            check_command(vllm_command)
        return "local"
    url = client_url(endpoint)
    if not url:
        raise ValueError("config: the llm endpoint has no URL (set azure_endpoint for kind: azure)")
    kind = classify(url)
    if not credentialed:
        return kind
    if kind == "public" and not allow_public:
        raise GuardError(
            f"refusing to send a credentialed corpus (corpus.credentialed: true) to the public endpoint "
            f"{host_of(url) or url!r}: the PhysioNet DUA forbids third-party APIs. Only loopback and "
            "private-network addresses count as local. Use Azure OpenAI or a local server, or set "
            "llm.allow_public_endpoint: true if the data's licence allows it."
        )
    proxy = proxy_for(url)
    if proxy and not allow_proxy:
        raise GuardError(
            f"refusing to send a credentialed corpus (corpus.credentialed: true) to {host_of(url)!r} through "
            f"the proxy {_redact(proxy)} (from the HTTP_PROXY / HTTPS_PROXY / ALL_PROXY environment "
            f"variables){'; over http:// it would read the report text in cleartext' if url.startswith('http:') else ''}. "
            f"Add the host to NO_PROXY (NO_PROXY={host_of(url)}), unset the proxy variables, or set "
            "llm.allow_proxy: true if the proxy is part of your approved environment."
        )
    return kind


def check_executor(cfg: dict) -> str:
    """:func:`check` for a stage's flat executor settings (``workflow.llm.run.load_executor_config``)."""
    return check(
        cfg["endpoint"],
        cfg["executor"],
        cfg["credentialed"],
        cfg["allow_public"],
        allow_proxy=cfg.get("allow_proxy", False),
        vllm_command=(cfg.get("vllm") or {}).get("command"),
    )


# --------------------------------------------------------------------------------------------------
# Does a corpus marked credentialed: false look like MIMIC-CXR?


def _first_ids(path: Path, columns: tuple[str, ...], limit: int = 2000) -> dict[str, list[int]]:
    """Up to ``limit`` integer values of each of ``columns`` from the top of a .csv(.gz)."""
    found: dict[str, list[int]] = {c: [] for c in columns}
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", errors="replace") as fh:
            for n, row in enumerate(csv.DictReader(fh)):
                if n >= limit:
                    break
                for c in columns:
                    value = (row.get(c) or "").strip()
                    if value.isdigit():
                        found[c].append(int(value))
    except (OSError, EOFError, csv.Error):
        pass
    return found


def _mostly_in(values: list[int], window: range) -> bool:
    return len(values) >= 5 and sum(v in window for v in values) >= 0.9 * len(values)


def mimic_signs(corpus: dict) -> list[str]:
    """Reasons to believe the configured corpus is MIMIC-CXR (empty: none found)."""
    fmt = corpus.get("format", "mimic")
    paths = {k: v for k, v in (corpus.get(fmt) or {}).items() if isinstance(v, str) and v}
    signs = []
    if fmt == "mimic":
        signs.append("corpus.format is mimic (the MIMIC-CXR layout files/pXX/pSUBJECT/sSTUDY.txt)")
    for key, value in sorted(paths.items()):
        if re.search(r"mimic|physionet", Path(value).name, re.IGNORECASE):
            signs.append(f"corpus.{fmt}.{key} is {Path(value).name!r} (a MIMIC-CXR / PhysioNet file name)")
    for key, value in sorted(paths.items()):
        path = Path(value)
        if not path.is_file() or not re.search(r"\.csv(\.gz)?$", path.name):
            continue
        ids = _first_ids(path, ("subject_id", "study_id", "uid"))
        if (
            _mostly_in(ids["subject_id"], MIMIC_SUBJECTS)
            or _mostly_in(ids["study_id"], MIMIC_STUDIES)
            or (_mostly_in(ids["uid"], MIMIC_STUDIES) or _mostly_in(ids["uid"], MIMIC_SUBJECTS))
        ):
            signs.append(f"corpus.{fmt}.{key} holds ids in MIMIC-CXR's ranges")
    return signs


def check_corpus(corpus: dict) -> list[str]:
    """Refuse ``credentialed: false`` for a MIMIC-looking corpus without ``confirm_not_credentialed``.

    Returns the signs found (logged as a warning when the confirmation is given).
    """
    if corpus.get("credentialed", True):
        return []
    signs = mimic_signs(corpus)
    if not signs:
        return []
    if not corpus.get("confirm_not_credentialed", False):
        raise GuardError(
            "corpus.credentialed is false, but the corpus looks like MIMIC-CXR, which is under the PhysioNet "
            "credentialed DUA: " + "; ".join(signs) + ". Set corpus.credentialed: true, or, if this data "
            "really is not credentialed (e.g. a synthetic corpus in MIMIC layout), also set "
            "corpus.confirm_not_credentialed: true."
        )
    log.warning(
        "corpus.credentialed: false confirmed by corpus.confirm_not_credentialed although the corpus looks "
        "like MIMIC-CXR (%s): the data-use guard will let it go to any endpoint",
        "; ".join(signs),
    )
    return signs
