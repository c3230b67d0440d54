"""Tokens and money: per-request cost from the price table, and the estimate shown before sending.

Prices are USD per million tokens, per model name (``llm.prices`` in config.yaml); the Batch API bills
at ``batch_discount`` of the online price. Token counts before sending are estimated from characters
(``chars_per_token``, about 4 for English radiology text with GPT tokenizers); the answers'
``usage`` gives the real counts afterwards.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

DEFAULT_CHARS_PER_TOKEN = 4.0
log = logging.getLogger(__name__)


@functools.cache
def _warn_unpriced(model: str) -> None:
    log.warning("llm.prices has no entry for model %r: its cost is counted as $0", model)


def price_of(model: str, prices: dict) -> dict:
    """The price entry of ``model``: exact name first, then the longest configured prefix."""
    if model in prices:
        return prices[model]
    best = max((m for m in prices if model.startswith(m)), key=len, default=None)
    if best is None:
        _warn_unpriced(model)
        return {"input": 0.0, "output": 0.0}
    return prices[best]


def cost(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    prices: dict,
    batch: bool = False,
    batch_discount: float = 0.5,
) -> float:
    p = price_of(model, prices)
    usd = (prompt_tokens * p.get("input", 0.0) + completion_tokens * p.get("output", 0.0)) / 1e6
    return usd * (batch_discount if batch else 1.0)


def estimate_tokens(chars: int, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    return int(chars / chars_per_token + 0.999)


@dataclass
class Estimate:
    requests: int
    cached: int
    to_send: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float

    def line(self) -> str:
        return (
            f"estimate: {self.requests} requests, {self.cached} cached, {self.to_send} to send, "
            f"~{self.prompt_tokens:,} prompt + ~{self.completion_tokens:,} completion tokens, "
            f"~${self.cost_usd:,.2f}"
        )

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def estimate(
    requests,
    pending_keys,
    prices: dict,
    batch: bool = False,
    batch_discount: float = 0.5,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
) -> Estimate:
    """Requests, tokens and cost of sending ``pending_keys`` (completion tokens: the ``max_tokens``
    bound when set, else a quarter of the prompt — an upper-side guess).

    Counted per distinct request key: studies with identical reports share one request, sent once."""
    pending = set(pending_keys)
    n = pt = ct = 0
    usd = 0.0
    seen: set[str] = set()
    for req in requests:
        if req.key in seen:
            continue
        seen.add(req.key)
        if req.key not in pending:
            continue
        n += 1
        p = estimate_tokens(req.prompt_chars() + 16 * len(req.messages), chars_per_token)
        c = int(req.params.get("max_tokens") or req.params.get("max_completion_tokens") or p // 4)
        pt += p
        ct += c
        usd += cost(req.model, p, c, prices, batch, batch_discount)
    return Estimate(len(seen), len(seen) - n, n, pt, ct, usd)
