"""An offline judge: a local Hugging Face causal LM's next-token probabilities of "A" and "B"."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def letter_token_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell ``letter`` as the next token after "More helpful:".

    Tokenizers differ on the leading space: byte-level BPE (GPT-2, Llama 3, SmolLM2)
    has distinct tokens "A" and "ĠA" (" A"); SentencePiece ones may map both spellings
    to "▁A". Every spelling that is a single token is kept (deduplicated); the
    letter's probability is the sum over them (logsumexp in log space).
    """
    ids = set()
    for variant in (letter, " " + letter):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    if not ids:
        raise ValueError(f"tokenizer has no single token for {letter!r} or {' ' + letter!r}")
    return sorted(ids)


class HFJudge:
    """Offline judge with a local Hugging Face causal LM (no generation).

    The judge prompt is wrapped as a user turn with the tokenizer's chat template
    when it has one (``use_chat_template=None`` decides automatically), and the
    assistant's answer is pre-filled with ``answer_prefix`` ("More helpful:"), so the
    verdict is the next token: "A" if log p(A) >= log p(B), else "B", where each
    letter's log-probability is the logsumexp over its single-token spellings ("A",
    " A"; see ``letter_token_ids``). This skips the Table 2 "Comparison:" sentence
    (a choice of this backend, not the paper's: scoring after a generated comparison
    would need generation and is slower). The answer is always "A" or "B"; an exact
    tie goes to "A" (position swapping in ``judge_win_rate`` cancels that bias).

    Prompts are batched (sorted by length, left-padded with explicit position ids so
    that padding does not change the result) and only the last position's logits are
    computed. ``max_length`` truncates from the left, keeping the answer prefix.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        use_chat_template: bool | None = None,
        answer_prefix: str = "More helpful:",
        max_length: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if use_chat_template is None:
            use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = use_chat_template
        self.answer_prefix = answer_prefix
        self.max_length = max_length
        self.ids_a = letter_token_ids(tokenizer, "A")
        self.ids_b = letter_token_ids(tokenizer, "B")
        if set(self.ids_a) & set(self.ids_b):
            raise ValueError("tokenizer maps 'A' and 'B' to a common token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._stats = dict(n_requests=0, n_cached=0, n_truncated=0, prompt_tokens=0, completion_tokens=0)

    def __repr__(self) -> str:
        return (
            f"HFJudge(model={type(self.model).__name__}, chat_template={self.use_chat_template}, "
            f"ids_a={self.ids_a}, ids_b={self.ids_b})"
        )

    def stats(self) -> dict[str, float]:
        """Cumulative counters; a local model costs nothing."""
        return {**self._stats, "cost_usd": 0.0}

    def build_text(self, prompt: str) -> str:
        """The text whose next token is the verdict."""
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return text + self.answer_prefix
        return prompt + "\n" + self.answer_prefix

    def _encode(self, prompt: str) -> list[int]:
        # The chat template already writes BOS/special tokens; plain text gets them here.
        ids = self.tokenizer(self.build_text(prompt), add_special_tokens=not self.use_chat_template)["input_ids"]
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[-self.max_length :]
            self._stats["n_truncated"] += 1
        return list(ids)

    def score(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """Per prompt: logp_a, logp_b (next-token log-probabilities, each letter summed
        over its spellings), p_a, p_b (their probabilities; p_a + p_b <= 1) and
        p_a_given_ab = p_a / (p_a + p_b)."""
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[dict[str, float] | None] = [None] * len(encoded)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    width = max(len(encoded[i]) for i in idx)
                    input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                    attention = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):
                        ids = encoded[i]
                        # Left padding: the last column is every row's next-token position.
                        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        attention[row, width - len(ids) :] = 1
                    # Positions count real tokens only, as generate() does, so a
                    # padded row scores like the same prompt alone.
                    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
                    kwargs = dict(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        position_ids=position_ids.to(device),
                    )
                    try:
                        logits = self.model(**kwargs, logits_to_keep=1).logits[:, -1, :]
                    except TypeError:  # models without logits_to_keep
                        logits = self.model(**kwargs).logits[:, -1, :]
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    lp_a = torch.logsumexp(logp[:, self.ids_a], dim=-1)
                    lp_b = torch.logsumexp(logp[:, self.ids_b], dim=-1)
                    p_a_given_ab = torch.sigmoid(lp_a - lp_b)
                    for row, i in enumerate(idx):
                        out[i] = dict(
                            logp_a=float(lp_a[row]),
                            logp_b=float(lp_b[row]),
                            p_a=math.exp(float(lp_a[row])),
                            p_b=math.exp(float(lp_b[row])),
                            p_a_given_ab=float(p_a_given_ab[row]),
                        )
                    self._stats["prompt_tokens"] += int(attention.sum())
        finally:
            self.model.train(was_training)
        self._stats["n_requests"] += len(encoded)
        return out  # type: ignore[return-value]

    def judge(self, prompts: Sequence[str]) -> list[str]:
        """"A" or "B" for each judge prompt (never unparseable)."""
        return ["A" if s["logp_a"] >= s["logp_b"] else "B" for s in self.score(prompts)]
