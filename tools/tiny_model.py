"""Build a tiny LLaMA locally for tests of the fine-tuning and vLLM paths: nothing is downloaded.

The tokenizer is a byte-level BPE trained on report text (the demo corpus, or any text files / zip
archives / directories given), plus the canonical vocabulary of ``libs/vocabulary.yaml`` and the JSON
keys of a findings answer, so prompts and answers tokenize to realistic lengths. The weights are random.

Shape constraints measured on this machine (../shared/reference/feasibility.md §2-3): vLLM's CPU
attention only supports head_dim in {32, 64, 80, ...}, so the model uses 2 heads of 32.

Its chat template renders exactly what LLaMA-Factory's ``default`` template trains on
(``System: ...\\nHuman: ...\\nAssistant:``), so a LoRA adapter trained with ``template: default`` sees
the same prompt when vLLM serves it through ``LLM.chat`` / the OpenAI server.

Run it with an interpreter that has torch, transformers and tokenizers (the LLaMA-Factory or vLLM venv):
``.venv-lf/bin/python -m tools.tiny_model --out DIR [--corpus data/demo/mimic-cxr-reports.zip]``.
"""

from __future__ import annotations

import json
import logging
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

from workflow import cli

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
VOCABULARY = REPO / "libs" / "vocabulary.yaml"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# LLaMA-Factory 0.9.5 `default` template: system "System: {content}</s>\n", user "Human: {content}</s>\nAssistant:",
# assistant "{content}</s>\n", no BOS (LLaMA-Factory encodes without special tokens). Same string as a HF
# chat template; LLaMA-Factory also writes its own copy as chat_template.jinja into the adapter folder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + eos_token + '\nAssistant:' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


def iter_corpus_text(paths: list[Path]) -> Iterator[str]:
    """Text of .txt files, directories of them, and zip archives of them (MIMIC-CXR report layout)."""
    for path in paths:
        if path.is_dir():
            for member in sorted(path.rglob("*.txt")):
                yield member.read_text(errors="replace")
        elif path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith(".txt"):
                        yield archive.read(name).decode("utf-8", errors="replace")
        else:
            yield path.read_text(errors="replace")


def vocabulary_text(seed: int = 0) -> list[str]:
    """Sentences and JSON answers built from the canonical vocabulary, so every term is a few tokens."""
    import yaml

    vocab = yaml.safe_load(VOCABULARY.read_text())
    loc = vocab["location"]
    locations = loc["laterality"] + loc["zone"] + loc["structure"]
    rng = random.Random(seed)
    lines = []
    for _ in range(400):
        finding = {
            "name": rng.choice(vocab["findings"]),
            "presence": rng.choice(vocab["presence"]),
            "location": " ".join(rng.sample(locations, 2)),
            "level": rng.choice(vocab["level"]),
            "type": rng.choice(vocab["type"]),
            "change": rng.choice(vocab["change"]),
            "evidence": f"{rng.choice(vocab['level'])} {rng.choice(vocab['findings'])} is seen.",
        }
        lines.append(json.dumps({"findings": [finding]}))
        lines.append(
            f"There is {finding['level']} {finding['type']} {finding['name']} in the {finding['location']}."
        )
    return lines


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tokenizer


def build(
    out: Path, corpus: list[Path], vocab_size: int = 2048, seed: int = 0, max_position: int = 4096
) -> Path:
    """Write tokenizer + random-weight LlamaForCausalLM to ``out``; returns ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = list(iter_corpus_text(corpus)) + vocabulary_text(seed)
    log.info("training tokenizer on %d texts from %d corpus paths", len(texts), len(corpus))
    raw = train_tokenizer(texts, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_position,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the smallest vLLM's CPU attention supports
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("tiny llama: vocab %d, %d parameters -> %s", len(tokenizer), model.num_parameters(), out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--corpus", type=Path, nargs="*", default=[], help="report text: .txt, directories, .zip")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    build(args.out, args.corpus, args.vocab_size, args.seed)


if __name__ == "__main__":
    main()
