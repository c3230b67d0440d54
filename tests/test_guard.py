"""The data-use guard (workflow/llm/guard.py): endpoint URL forms × proxy settings, the offline executor's
command, and corpora marked ``credentialed: false`` that look like MIMIC-CXR."""

from __future__ import annotations

import csv
import gzip
import ipaddress
import logging
import socket
import zipfile

import httpx2
import openai
import pytest

from workflow.llm import guard
from workflow.llm.answers import FINDINGS_SCHEMA
from workflow.llm.guard import GuardError, check, classify, proxy_for
from workflow.llm.request import build_request
from workflow.llm.run import load_executor_config, run_requests

PROXY_VARS = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "REQUEST_METHOD",
    "OPENAI_BASE_URL",
    "AZURE_OPENAI_ENDPOINT",
)

# 104.18.33.64 is a public address; 127.0.0.1 loopback. Each written in the forms a resolver accepts.
PUBLIC = [
    "https://api.openai.com/v1",
    "https://1746011840/v1",  # decimal integer of 104.18.33.64
    "https://0x68122140/v1",  # hex integer
    "https://015004420500/v1",  # octal integer
    "https://104.1188160/v1",  # a.b (b fills 24 bits)
    "https://0x68.0x12.0x21.0x40/v1",
    "http://[2606:4700::6812:2140]/v1",  # public IPv6
    "http://[::ffff:104.18.33.64]/v1",  # IPv4-mapped public
    "http://[::ffff:6812:2140]/v1",
    "http://169.254.169.254/latest",  # link-local: cloud metadata, not a model server
    "http://[fe80::1%25eth0]:8000/v1",
    "http://100.64.0.1/v1",  # shared CGNAT space
    "http://172.32.0.1/v1",  # just outside 172.16/12
    "http://0.0.0.0:8000/v1",
    "https://myres.openai.azure.com.evil.example/v1",
    "https://myres.openai.azure.com@evil.example/v1",  # userinfo: the client connects to evil.example
    "http://gpu-node.invalid:8000/v1",  # does not resolve: not known to be local
    "not a url",
]
LOCAL = [
    "http://127.0.0.1:8000/v1",
    "http://localhost:1/v1",
    "http://2130706433:8000/v1",  # decimal 127.0.0.1
    "http://0x7f000001:8000/v1",
    "http://017700000001:8000/v1",
    "http://127.1:8000/v1",
    "http://0x7f.1/v1",
    "http://[::1]:8000/v1",
    "http://[::ffff:127.0.0.1]:8000/v1",
    "http://[::ffff:7f00:1]:8000/v1",
    "http://10.1.2.3:8000/v1",
    "http://172.31.255.254/v1",
    "http://192.168.1.1/v1",
    "http://[fd12:3456::1]/v1",
]
AZURE = [
    "https://myres.openai.azure.com",
    "https://x.cognitiveservices.azure.com/",
    "https://y.services.ai.azure.com",
]


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)


def endpoint(url: str) -> dict:
    if ".azure.com" in url and "@" not in url and "evil" not in url:
        return {"kind": "azure", "azure_endpoint": url, "model": "gpt-4o", "api_version": "2024-10-21"}
    return {"kind": "openai", "base_url": url, "model": "student"}


@pytest.mark.parametrize("url", PUBLIC)
def test_public_forms_are_public_and_refused_for_a_credentialed_corpus(url):
    assert classify(url) == "public"
    with pytest.raises(GuardError, match="credentialed"):
        check(endpoint(url), "openai", credentialed=True, allow_public=False)
    assert check(endpoint(url), "openai", credentialed=True, allow_public=True) == "public"
    assert check(endpoint(url), "openai", credentialed=False, allow_public=False) == "public"


@pytest.mark.parametrize("url", LOCAL)
def test_loopback_and_private_forms_are_local(url):
    assert classify(url) == "local"
    assert check(endpoint(url), "openai", credentialed=True, allow_public=False) == "local"


@pytest.mark.parametrize("url", AZURE)
def test_azure_is_allowed(url):
    assert check(endpoint(url), "openai", credentialed=True, allow_public=False) == "azure"


@pytest.mark.parametrize(
    "host", ["1746011840", "0x68122140", "015004420500", "104.1188160", "127.1", "0x7f.1", "017700000001"]
)
def test_ip_literals_are_read_as_the_system_resolver_reads_them(host):
    resolved = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)}
    assert resolved == {guard.ip_literal(host)}


# (environment, URLs the client sends through a proxy)
PROXY_CASES = [
    ({}, set()),
    ({"HTTP_PROXY": "http://proxy.example:3128"}, {"http"}),
    ({"http_proxy": "http://user:secret@proxy.example:3128"}, {"http"}),
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, {"https"}),
    ({"ALL_PROXY": "http://proxy.example:3128"}, {"http", "https"}),
    ({"ALL_PROXY": "http://proxy.example:3128", "NO_PROXY": "*"}, set()),
    ({"ALL_PROXY": "http://proxy.example:3128", "NO_PROXY": "127.0.0.1,localhost,::1"}, {"except-no-proxy"}),
    (
        {"ALL_PROXY": "http://proxy.example:3128", "NO_PROXY": ".openai.azure.com,10.0.0.0/8"},
        {"except-no-proxy"},
    ),
]
TARGETS = {
    "http://127.0.0.1:8000/v1": ("http", {"127.0.0.1"}),
    "http://localhost:8000/v1": ("http", {"localhost"}),
    "http://[::1]:8000/v1": ("http", {"::1"}),
    "http://10.1.2.3:8000/v1": ("http", {"10.0.0.0/8"}),
    "https://myres.openai.azure.com/": ("https", {".openai.azure.com"}),
}


def sdk_uses_a_proxy(url: str) -> bool:
    """What the openai SDK's own HTTP client does for ``url`` in this environment."""
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    http = client._client
    return http._transport_for_url(httpx2.URL(url)) is not http._transport


@pytest.mark.parametrize("env,proxied", PROXY_CASES)
@pytest.mark.parametrize("url", sorted(TARGETS))
def test_a_proxy_the_client_would_use_is_refused_for_a_credentialed_corpus(monkeypatch, env, proxied, url):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    scheme, no_proxy_hosts = TARGETS[url]
    if "except-no-proxy" in proxied:
        listed = any(h in env["NO_PROXY"].split(",") for h in no_proxy_hosts)
        expected = not listed
    else:
        expected = scheme in proxied
    assert (proxy_for(url) is not None) == expected == sdk_uses_a_proxy(url)
    ep = endpoint(url)
    if expected:
        with pytest.raises(GuardError, match="proxy") as err:
            check(ep, "openai", credentialed=True, allow_public=False)
        assert "secret" not in str(err.value)  # proxy credentials never reach a message
        assert ("cleartext" in str(err.value)) == url.startswith("http:")
        assert check(ep, "openai", credentialed=True, allow_public=False, allow_proxy=True) in (
            "local",
            "azure",
        )
    else:
        assert check(ep, "openai", credentialed=True, allow_public=False) in ("local", "azure")
    # An open corpus is not held back by a proxy.
    assert check(ep, "openai", credentialed=False, allow_public=False) in ("local", "azure")


def test_an_unset_url_is_judged_by_what_the_sdk_uses_instead(monkeypatch):
    unset = {"kind": "openai", "base_url": None, "model": "m"}
    assert check(unset, "openai", credentialed=True, allow_public=True) == "public"  # api.openai.com
    monkeypatch.setenv("OPENAI_BASE_URL", "http://1746011840/v1")
    with pytest.raises(GuardError, match="public endpoint '1746011840'"):
        check(unset, "openai", credentialed=True, allow_public=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    assert check(unset, "openai", credentialed=True, allow_public=False) == "local"
    # The same URL as the SDK's own client.
    assert httpx2.URL(guard.client_url(unset)).host == openai.OpenAI(api_key="x").base_url.host == "127.0.0.1"
    azure = {"kind": "azure", "azure_endpoint": None, "model": "m", "api_version": "2024-10-21"}
    with pytest.raises(ValueError, match="no URL"):
        check(azure, "openai", credentialed=True, allow_public=False)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://evil.example")
    with pytest.raises(GuardError, match="evil.example"):
        check(azure, "openai", credentialed=True, allow_public=False)
    sdk = openai.AzureOpenAI(api_version="2024-10-21", api_key="x")
    assert httpx2.URL(guard.client_url(azure)).host == sdk.base_url.host == "evil.example"


def test_run_requests_refuses_before_sending_and_the_config_key_opts_in(monkeypatch, tmp_path):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    reqs = [
        build_request(
            "keyinfo.j2",
            "student",
            {"temperature": 0, "max_tokens": 50},
            FINDINGS_SCHEMA,
            meta={"study_id": 1},
            report="No pneumothorax.",
        )
    ]
    cfg = {
        "corpus": {"credentialed": True},
        "llm": {
            "endpoints": {"e": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "student"}},
            "keyinfo": {"endpoint": "e"},
            "prices": {},
        },
    }
    with pytest.raises(GuardError, match="NO_PROXY"):
        run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite", dry_run=True)
    cfg["llm"]["allow_proxy"] = True
    assert (
        run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite", dry_run=True).to_send
        == 1
    )
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    cfg["llm"]["allow_proxy"] = False
    assert (
        run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite", dry_run=True).to_send
        == 1
    )


LOCAL_COMMANDS = [
    None,
    [
        ".venv-vllm/bin/python",
        "-m",
        "workflow.llm.vllm_offline",
        "--requests",
        "{input}",
        "--output",
        "{output}",
        "--model",
        "/models/base",
        "--lora",
        "{model}=results/finetune/adapter",
        "--tensor-parallel-size",
        "4",
    ],
    ["nice", "-n", "5", "python", "-m", "workflow.llm.vllm_offline", "--requests", "{input}"],
    ["python", "runner.py", "--host", "127.0.0.1"],
    ["bash", "-c", "python -m workflow.llm.vllm_offline --requests {input} --output {output}"],
]
REMOTE_COMMANDS = [
    ["ssh", "gpu-node", "python", "-m", "workflow.llm.vllm_offline"],
    ["/usr/bin/scp", "{input}", "me@gpu.example.org:/tmp/"],
    ["env", "CUDA_VISIBLE_DEVICES=0", "rsync", "{input}", "gpu:/tmp/"],
    ["bash", "-c", "cat {input} | ssh gpu-node runner > {output}"],
    ["python", "upload.py", "--server", "https://api.example.com/v1/batch"],
    ["python", "runner.py", "--host=1746011840"],
    ["python", "runner.py", "--host", "gpu.example.org"],
    ["curl", "-T", "{input}", "http://10.0.0.5/upload"],  # curl is a network tool even to a private host
]


@pytest.mark.parametrize("command", LOCAL_COMMANDS)
def test_a_local_vllm_command_is_accepted(command):
    assert check({}, "vllm", credentialed=True, allow_public=False, vllm_command=command) == "local"


@pytest.mark.parametrize("command", REMOTE_COMMANDS)
def test_a_vllm_command_naming_a_remote_host_is_refused(command):
    with pytest.raises(GuardError, match="llm.vllm.command"):
        check({}, "vllm", credentialed=True, allow_public=False, vllm_command=command)
    # An open corpus, or the explicit opt-in, is not held back.
    assert check({}, "vllm", credentialed=False, allow_public=False, vllm_command=command) == "local"
    assert check({}, "vllm", credentialed=True, allow_public=True, vllm_command=command) == "local"
    cfg = load_executor_config(
        {
            "corpus": {"credentialed": True},
            "llm": {
                "endpoints": {"e": {"kind": "openai", "model": "m", "executor": "vllm"}},
                "vllm": {"command": command},
                "keyinfo": {"endpoint": "e"},
            },
        },
        "keyinfo",
    )
    with pytest.raises(GuardError):
        guard.check_executor(cfg)


# -- corpora marked credentialed: false ----------------------------------------------------------
def write_csv(path, header, rows):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_a_mimic_layout_corpus_marked_not_credentialed_needs_a_confirmation(tmp_path, caplog):
    zip_path = tmp_path / "reports.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("files/p10/p10000032/s50414267.txt", "FINDINGS: clear.\n")
    rows = [[f"d{i}", 50000000 + i, 10000000 + i, "train"] for i in range(20)]
    corpus = {
        "format": "mimic",
        "credentialed": False,
        "mimic": {
            "reports": str(zip_path),
            "split": write_csv(tmp_path / "split.csv", ["dicom_id", "study_id", "subject_id", "split"], rows),
            "metadata": write_csv(tmp_path / "meta.csv", ["dicom_id", "subject_id", "study_id"], rows),
        },
    }
    with pytest.raises(GuardError, match="confirm_not_credentialed") as err:
        guard.check_corpus(corpus)
    assert "corpus.format is mimic" in str(err.value) and "MIMIC-CXR's ranges" in str(err.value)
    corpus["confirm_not_credentialed"] = True
    with caplog.at_level(logging.WARNING):
        assert guard.check_corpus(corpus)
    assert "looks like MIMIC-CXR" in caplog.text
    assert guard.check_corpus({**corpus, "credentialed": True, "confirm_not_credentialed": False}) == []


def test_mimic_ids_in_iu_layout_are_recognised_and_iu_ids_are_not(tmp_path):
    header = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
    iu = {
        "reports": write_csv(
            tmp_path / "indiana_reports.csv",
            header,
            [[i, "", "", "", "", "", "clear", "normal"] for i in range(1, 50)],
        ),
        "projections": write_csv(
            tmp_path / "indiana_projections.csv",
            ["uid", "filename", "projection"],
            [[i, f"{i}_IM-0001-1001.dcm.png", "Frontal"] for i in range(1, 50)],
        ),
    }
    assert guard.check_corpus({"format": "iu", "credentialed": False, "iu": iu}) == []
    disguised = {
        "reports": write_csv(
            tmp_path / "reports.csv",
            header,
            [[50000000 + i, "", "", "", "", "", "clear", "normal"] for i in range(50)],
        ),
        "projections": iu["projections"],
    }
    with pytest.raises(GuardError, match="corpus.iu.reports holds ids in MIMIC-CXR's ranges"):
        guard.check_corpus({"format": "iu", "credentialed": False, "iu": disguised})
