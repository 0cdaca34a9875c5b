"""LLM-judge evaluation: win rate of policy responses against reference responses.

The paper (Nguyen et al. 2025, arXiv 2506.08681, section 5 and appendix Table 2)
evaluates the dialogue task (Anthropic-HH) with an LLM judge: 256 prompts, one
policy completion each, judged against the reference completion by gpt-4o-mini
with the Table 2 prompt, the A/B positions randomly swapped to cancel the judge's
position bias. The protocol comes from DPO (Rafailov et al. 2023, section 6.1 and
appendix C.2), whose GPT-4 prompt Table 2 adapts.

Contents:

- ``JUDGE_PROMPT`` / ``format_judge_prompt``: the Table 2 prompt.
- ``parse_verdict``: "More helpful: A" -> "A"; None when unparseable or ambiguous.
- ``OpenAIJudge``: any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint
  (OpenAI, vLLM, llama.cpp server, ...) through the official ``openai`` client (the
  optional extra ``isdpo[judge]``), with bounded concurrency, retries, an on-disk cache
  and token/cost accounting.
- ``HFJudge``: an offline judge with a local Hugging Face causal LM that compares the
  next-token probabilities of "A" and "B" after "More helpful:".
- ``judge_win_rate``: the evaluation loop (seeded position swapping, undoing the swap,
  win rate over parsed answers plus the conservative rate, per-item records).

A judge is any object with ``judge(prompts: Sequence[str]) -> list[str]`` (raw answer
texts, parsed by ``parse_verdict``) and optionally ``stats() -> dict`` (cumulative
numeric counters such as tokens and cost).
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "JUDGE_PROMPT",
    "format_judge_prompt",
    "parse_verdict",
    "JudgeError",
    "JudgeHTTPError",
    "JudgeRetryError",
    "JudgeResponseError",
    "OpenAIJudge",
    "HFJudge",
    "judge_win_rate",
    "save_records_jsonl",
]

# ---------------------------------------------------------------------------
# Prompt and verdict parsing
# ---------------------------------------------------------------------------

#: The judge prompt of the paper's Table 2 (appendix C), placeholders as
#: ``str.format`` fields (docs/method.md quotes the table). The paper wraps the
#: prose at its page's columns, so the wraps are typesetting and each instruction
#: paragraph is one line here (as in DPO's original prompt); "Response B:
#: <Response B>" sits on one line in the table, so it does here too.
JUDGE_PROMPT = (
    "For the following dialogue history to a chatbot, which response is more helpful?\n"
    "Dialogue history:\n"
    "{history}\n"
    "Response A:\n"
    "{response_a}\n"
    "Response B: {response_b}\n"
    'FIRST provide a one-sentence comparison of the two responses and explain which you '
    'feel is more helpful. SECOND, on a new line, state only "A" or "B" to indicate which '
    "response is more helpful. Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    'More helpful: <"A" or "B">'
)


def format_judge_prompt(history: str, response_a: str, response_b: str) -> str:
    """Fill ``JUDGE_PROMPT`` (paper Table 2) with a dialogue history and two responses.

    Surrounding whitespace of each field is stripped (HH prompts start with
    "\\n\\nHuman:"; sampled responses often start with a space). Braces inside the
    fields are safe: only the template is parsed by ``str.format``.
    """
    return JUDGE_PROMPT.format(
        history=history.strip(), response_a=response_a.strip(), response_b=response_b.strip()
    )


# Markdown emphasis/heading/quote characters removed before matching a line, so
# "**More helpful:** A", "### More helpful: A" and "> More helpful: `A`" all match.
_MARKDOWN_CHARS = re.compile(r"[*_`#>~]")
_LABEL_LINE = re.compile(r"^\s*(?:[-\u2022]\s*)?more\s+helpful(?:\s+response)?\s*[:\uff1a=\-\u2013\u2014]?\s*(.*)$", re.I)
# Characters that may wrap the letter: quotes (straight and curly), brackets, final punctuation.
_WRAPPERS = " \t\"'\u201c\u201d\u2018\u2019()[]{}<>.,;:!"
_LETTER = re.compile(r"^(?:response\s+)?([ab])$", re.I)
_INLINE_LABEL = re.compile(
    r"\bmore\s+helpful\s*:\s*[\"'\u201c\u2018(\[]?\s*(?:response\s+)?([ab])\s*[\"'\u201d\u2019)\]]?\s*\.?\s*$", re.I
)
_ANY_LABEL = re.compile(r"\bmore\s+helpful\s*:\s*[\"'\u201c\u2018(\[]?\s*(?:response\s+)?([ab])\b", re.I)


def _letter(value: str) -> str | None:
    """The verdict letter if ``value`` is exactly one (optionally "Response X", wrapped)."""
    m = _LETTER.match(value.strip(_WRAPPERS))
    return m.group(1).upper() if m else None


def parse_verdict(text: str | None) -> str | None:
    """Parse a judge answer in the Table 2 format into "A", "B" or None.

    Accepted: a line ``More helpful: A`` (case-insensitive label; optional markdown
    such as ``**More helpful:** A``; the letter optionally quoted, bracketed, followed
    by a full stop, or written "Response A"). If no line starts with the label, a
    label that ends a line ("Comparison: ... clearer. More helpful: B") is accepted;
    failing that, an answer whose last non-empty line is only the letter: the
    prompt's "on a new line, state only A or B" without the label (and what
    ``HFJudge`` returns).

    Returns None (never a guess) when: nothing matches; the labelled value is not a
    single letter ("A or B", "Both", "C", "A, because ..."); or several labelled lines
    disagree.
    """
    if not text:
        return None
    lines = [_MARKDOWN_CHARS.sub("", line) for line in text.splitlines()]
    labelled = set()
    n_labels = 0
    for line in lines:
        m = _LABEL_LINE.match(line)
        if m:
            n_labels += 1
            labelled.add(_letter(m.group(1)))
    if n_labels:
        # A labelled line that does not parse, or two that disagree, makes the
        # answer ambiguous: do not fall back to other heuristics.
        return labelled.pop() if len(labelled) == 1 else None
    # The label run into the comparison line ("... clearer. More helpful: B"): only
    # when it ends the line, so "Response A is more helpful: it ..." is not read.
    final = {m.group(1).upper() for line in lines for m in [_INLINE_LABEL.search(line)] if m}
    if final:
        # Any other "more helpful: X" in the text must agree.
        anywhere = {m.group(1).upper() for line in lines for m in _ANY_LABEL.finditer(line)}
        letters = final | anywhere
        return letters.pop() if len(letters) == 1 else None
    non_empty = [line for line in lines if line.strip()]
    return _letter(non_empty[-1]) if non_empty else None


# ---------------------------------------------------------------------------
# OpenAI-compatible HTTP judge
# ---------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """Base class of judge failures. Messages never contain the API key."""


class JudgeHTTPError(JudgeError):
    """A non-retryable HTTP status (4xx other than 429): bad request, auth, unknown model."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JudgeRetryError(JudgeError):
    """Retries exhausted on 429 / 5xx / connection errors / timeouts."""


class JudgeResponseError(JudgeError):
    """A 200 response that is not a chat-completions JSON object."""


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 10.2.3).

    Accepts delay-seconds (also fractional, which some gateways send) or an
    HTTP-date; returns None when absent or unparseable.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _SqliteCache:
    """Answer cache in one sqlite file: every insert is its own committed transaction,
    so a crash mid-evaluation leaves only whole entries and a rerun resumes."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # One connection shared by the worker threads, serialised by the lock;
        # the sqlite timeout covers other processes writing the same file.
        self._conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        with self._lock, self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                " key TEXT PRIMARY KEY, model TEXT, content TEXT,"
                " prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT content FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, content: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, content, prompt_tokens, completion_tokens, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _import_openai():
    """The official ``openai`` client, an optional extra (imported only by ``OpenAIJudge``)."""
    try:
        import openai
    except ImportError as e:
        raise JudgeError(
            "judge.backend=openai needs the openai package: pip install isdpo[judge] (or pip install openai)"
        ) from e
    return openai


# The client needs some api_key at construction (and would otherwise read OPENAI_API_KEY into
# the object); the real key goes in each request's Authorization header instead, so the client
# never holds it. This placeholder is never sent.
_NO_CLIENT_KEY = "unused-the-key-is-sent-per-request"


class OpenAIJudge:
    """Judge through an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    The HTTP layer is the official ``openai`` client (``pip install isdpo[judge]``) with its
    own retries off (``max_retries=0``): the retry loop here owns retries, so that the
    backoff is configurable, ``Retry-After`` is honoured up to ``retry_after_max_s`` (the
    client's cap and its 0.5-8 s backoff are fixed), retries are counted in ``stats()``
    and failures raise ``JudgeError``s with the key scrubbed. The paper's judge is
    ``OpenAIJudge("https://api.openai.com/v1", "gpt-4o-mini")``.

    Args:
        base_url: API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
        model: model name sent in the request and part of the cache key.
        api_key_env: name of the environment variable holding the key, read at each
            request and sent as that request's Authorization header (so the key is never
            stored on this object or on the client). ``None`` sends no Authorization
            header (local servers). The key is never logged, printed, put in exceptions
            or reprs, or written to the cache.
        max_concurrency: threads sending requests at once.
        max_retries: retries after the first attempt, on 429, 5xx, connection errors
            and timeouts. Other 4xx raise ``JudgeHTTPError`` at once.
        timeout_s: timeout per attempt (connect, read, write).
        cache_path: sqlite file of answers; ``None`` disables caching.
        temperature, max_tokens: sampling parameters of the request.
        price_per_1k_input, price_per_1k_output: USD per 1000 tokens; defaults are
            gpt-4o-mini's list prices ($0.15 / $0.60 per 1M tokens, OpenAI pricing
            page, 2024-07).
        backoff_base_s, backoff_max_s: exponential backoff ``base * 2**attempt``
            (capped), times a jitter factor in [0.5, 1.5).
        retry_after_max_s: cap on a server's ``Retry-After`` (honoured up to this).
        extra_body: extra JSON fields of the request (e.g. ``{"seed": 0}``, or
            ``max_completion_tokens`` for models that refuse ``max_tokens``).

    The cache key is sha256 of (model, full prompt text, temperature, max_tokens,
    extra_body). The prompt holds the dialogue history and both responses in their
    positions, so the key covers model, prompt and both responses; the sampling
    parameters are in it too so that changing them never serves a stale answer.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        cache_path: str | os.PathLike | None = None,
        temperature: float = 0.0,
        max_tokens: int = 128,
        price_per_1k_input: float = 0.00015,
        price_per_1k_output: float = 0.0006,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        retry_after_max_s: float = 120.0,
        extra_body: dict | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self._sdk = _import_openai()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.price_per_1k_input = price_per_1k_input
        self.price_per_1k_output = price_per_1k_output
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.extra_body = dict(extra_body or {})
        self.cache_path = None if cache_path is None else Path(cache_path)
        self._url = f"{self.base_url}/chat/completions"
        # One client (one connection pool) shared by the worker threads; it keeps the
        # environment's proxy settings (http(s)_proxy, no_proxy).
        self._client = self._sdk.OpenAI(
            base_url=self.base_url, api_key=_NO_CLIENT_KEY, max_retries=0, timeout=timeout_s
        )
        self._cache = None if cache_path is None else _SqliteCache(cache_path)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._stats = dict(
            n_requests=0,  # successful API calls (answers that cost tokens)
            n_cached=0,  # answers served without a request (cache hit or in-batch duplicate)
            n_retries=0,  # retried attempts
            prompt_tokens=0,
            completion_tokens=0,
            n_missing_usage=0,  # responses without a usage object (counted as 0 tokens)
        )

    # -- presentation: the key is never an attribute, so it cannot leak here --
    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, cache_path={str(self.cache_path) if self.cache_path else None!r})"
        )

    def close(self) -> None:
        """Close the HTTP client and the cache file."""
        self._client.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> "OpenAIJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accounting --
    def stats(self) -> dict[str, float]:
        """Cumulative counters (thread-safe snapshot) and the cost in USD."""
        with self._lock:
            s = dict(self._stats)
        s["cost_usd"] = (
            s["prompt_tokens"] / 1000.0 * self.price_per_1k_input
            + s["completion_tokens"] / 1000.0 * self.price_per_1k_output
        )
        return s

    def _add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self._stats[k] += v

    # -- requests --
    def cache_key(self, prompt: str) -> str:
        """sha256 of (model, prompt, sampling parameters) as canonical JSON."""
        blob = json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "extra_body": self.extra_body,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"environment variable {self.api_key_env} is not set (the API key is read "
                "from it at request time); pass api_key_env=None for servers without auth"
            )
        return key

    def _scrub(self, text: str, key: str | None) -> str:
        # Servers may echo the key in error bodies ("Incorrect API key provided: sk-...").
        return text.replace(key, "***") if key else text

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        ra = _parse_retry_after(retry_after)
        if ra is not None:
            # The server said when to come back: wait that long (capped), plus a
            # little jitter so concurrent workers do not return in lockstep.
            return min(ra, self.retry_after_max_s) + self._rng.uniform(0.0, self.backoff_base_s)
        return min(self.backoff_max_s, self.backoff_base_s * 2.0**attempt) * (0.5 + self._rng.random())

    def _create(self, prompt: str, key: str | None) -> Any:
        """One attempt through the client: a ChatCompletion, or the raw text of a non-JSON 200."""
        # Omit() drops the header altogether (no key configured: a local server).
        auth = f"Bearer {key}" if key else self._sdk.Omit()
        return self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            extra_body=self.extra_body or None,
            extra_headers={"Authorization": auth},
        )

    def _request(self, prompt: str) -> Any:
        """One chat completion with retries; returns the client's parsed response."""
        last_error = ""
        for attempt in range(self.max_retries + 1):
            key = self._api_key()
            retry_after = None
            failure: JudgeError | None = None
            try:
                return self._create(prompt, key)
            except self._sdk.APIStatusError as e:
                detail = self._scrub(e.response.text[:500], key)
                retry_after = e.response.headers.get("retry-after")
                if e.status_code != 429 and e.status_code < 500:
                    failure = JudgeHTTPError(
                        e.status_code, f"{self._url} returned HTTP {e.status_code} (not retried): {detail}"
                    )
                last_error = f"HTTP {e.status_code}: {detail}"
            except self._sdk.APIConnectionError as e:
                # Connection refused/reset, DNS, timeouts (APITimeoutError), truncated
                # bodies; the cause names which.
                cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
                last_error = self._scrub(f"{type(e).__name__}: {e}{cause}", key)
            except json.JSONDecodeError as e:  # a JSON content type whose body does not decode
                failure = JudgeResponseError(
                    f"{self._url} returned 200 with a body that is not JSON: "
                    f"{self._scrub(e.doc[:300], key)!r}"
                )
            if failure is not None:
                # Raised outside the except block: the client's exception (which holds the
                # request, Authorization header included) is not chained to ours.
                raise failure
            if attempt == self.max_retries:
                break
            self._add(n_retries=1)
            time.sleep(self._delay(attempt, retry_after))
        raise JudgeRetryError(
            f"{self._url}: giving up after {self.max_retries + 1} attempts; last error: {last_error}"
        )

    def _complete(self, prompt: str, key: str) -> str:
        completion = self._request(prompt)
        if isinstance(completion, str):  # the client returns a non-JSON body as text
            raise JudgeResponseError(
                f"{self._url} returned 200 with a body that is not JSON: {completion[:300]!r}"
            )
        try:
            message = completion.choices[0].message
        except (AttributeError, IndexError, TypeError):
            raise JudgeResponseError(
                f"{self._url} returned JSON without choices[0].message: {str(completion)[:300]!r}"
            ) from None
        # content may be null (e.g. a refusal): an empty answer, parsed as unparseable.
        content = getattr(message, "content", None) or ""
        usage = getattr(completion, "usage", None)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0)
        ct = int(getattr(usage, "completion_tokens", 0) or 0)
        self._add(n_requests=1, prompt_tokens=pt, completion_tokens=ct, n_missing_usage=int(usage is None))
        if self._cache is not None:
            self._cache.put(key, self.model, content, pt, ct)
        return content

    def judge(self, prompts: Sequence[str]) -> list[str]:
        """Raw answer text for each judge prompt, in order.

        Cached answers are served without a request (cost 0, counted in
        ``n_cached``); identical prompts in one call are sent once. The misses go
        out on at most ``max_concurrency`` threads; each answer is cached as soon as
        it arrives, so an interrupted run resumes where it stopped. The first
        failure cancels the requests not yet started and is raised.
        """
        keys = [self.cache_key(p) for p in prompts]
        answers: dict[str, str] = {}
        misses: dict[str, str] = {}
        n_served = 0
        for prompt, key in zip(prompts, keys):
            if key in answers or key in misses:
                n_served += 1
                continue
            cached = self._cache.get(key) if self._cache is not None else None
            if cached is not None:
                answers[key] = cached
                n_served += 1
            else:
                misses[key] = prompt
        self._add(n_cached=n_served)
        if misses:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(misses)))
            futures = {pool.submit(self._complete, p, k): k for k, p in misses.items()}
            try:
                for future in concurrent.futures.as_completed(futures):
                    answers[futures[future]] = future.result()
            finally:
                # On error: drop what has not started; running requests finish (and are cached).
                pool.shutdown(wait=True, cancel_futures=True)
        return [answers[k] for k in keys]

    def judge_one(self, prompt: str) -> str:
        """Raw answer text for one judge prompt."""
        return self.judge([prompt])[0]


# ---------------------------------------------------------------------------
# Local Hugging Face judge
# ---------------------------------------------------------------------------


def _letter_token_ids(tokenizer, letter: str) -> list[int]:
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
    " A"; see ``_letter_token_ids``). This skips the Table 2 "Comparison:" sentence
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
        self.ids_a = _letter_token_ids(tokenizer, "A")
        self.ids_b = _letter_token_ids(tokenizer, "B")
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


# ---------------------------------------------------------------------------
# Evaluation loop
# ---------------------------------------------------------------------------


def _positions(n: int, seed: int, balanced: bool) -> list[str]:
    """Seeded position of the policy response ("A" or "B") for each of n items."""
    rng = random.Random(seed)
    if not balanced:
        return [rng.choice("AB") for _ in range(n)]
    # Exactly half the items at each position (the odd one by a coin), in a random
    # order: still a random swap per item, but the judge's position bias cancels
    # exactly instead of only in expectation.
    positions = ["A"] * (n // 2) + ["B"] * (n // 2)
    if n % 2:
        positions.append(rng.choice("AB"))
    rng.shuffle(positions)
    return positions


def judge_win_rate(
    judge,
    prompts: Sequence[str],
    policy_responses: Sequence[str],
    reference_responses: Sequence[str],
    seed: int = 0,
    balanced: bool = True,
) -> dict[str, Any]:
    """Win rate of the policy's responses against the reference's, by an LLM judge.

    Paper protocol (section 5, dialogue task): one policy completion per prompt
    against the reference completion, the positions randomly swapped. Here a seeded
    random position is drawn per item (``balanced=True``: a random arrangement with
    exactly half the items at each position; ``balanced=False``: independent fair
    coins, the paper's wording), the judge answers, and the swap is undone.

    Returns a dict with:
        win_rate: n_wins / (n_wins + n_losses), over parsed answers (the paper's
            rate); nan if nothing parsed.
        win_rate_conservative: n_wins / n (unparseable answers count as losses).
        win_rate_se: binomial standard error of win_rate.
        n, n_wins, n_losses, n_unparseable, n_policy_at_a, swap_fraction (fraction
            of items with the policy at position B), verdict_a_fraction (parsed
            verdicts naming A: the judge's position bias).
        records: per item {index, prompt, policy, reference, policy_position, raw,
            verdict, policy_won} (policy_won None when unparseable), for JSONL.
        the judge's counters for this call (``stats()`` difference), e.g.
            prompt_tokens, completion_tokens, cost_usd, n_requests, n_cached.
    """
    n = len(prompts)
    if not (len(policy_responses) == n and len(reference_responses) == n):
        raise ValueError(
            f"prompts ({n}), policy_responses ({len(policy_responses)}) and "
            f"reference_responses ({len(reference_responses)}) must have the same length"
        )
    if n == 0:
        raise ValueError("nothing to judge: no prompts")
    positions = _positions(n, seed, balanced)
    judge_prompts = [
        format_judge_prompt(x, y, r) if pos == "A" else format_judge_prompt(x, r, y)
        for x, y, r, pos in zip(prompts, policy_responses, reference_responses, positions)
    ]
    before = judge.stats() if hasattr(judge, "stats") else {}
    raw_answers = judge.judge(judge_prompts)
    after = judge.stats() if hasattr(judge, "stats") else {}
    if len(raw_answers) != n:
        raise JudgeError(f"judge returned {len(raw_answers)} answers for {n} prompts")

    records = []
    n_wins = n_losses = n_a = 0
    for i, (x, y, r, pos, raw) in enumerate(zip(prompts, policy_responses, reference_responses, positions, raw_answers)):
        verdict = parse_verdict(raw)
        won = None if verdict is None else verdict == pos
        n_wins += won is True
        n_losses += won is False
        n_a += verdict == "A"
        records.append(
            dict(index=i, prompt=x, policy=y, reference=r, policy_position=pos, raw=raw, verdict=verdict, policy_won=won)
        )
    parsed = n_wins + n_losses
    win_rate = n_wins / parsed if parsed else float("nan")
    result: dict[str, Any] = dict(
        win_rate=win_rate,
        win_rate_conservative=n_wins / n,
        win_rate_se=math.sqrt(win_rate * (1 - win_rate) / parsed) if parsed else float("nan"),
        n=n,
        n_wins=n_wins,
        n_losses=n_losses,
        n_unparseable=n - parsed,
        n_policy_at_a=positions.count("A"),
        swap_fraction=positions.count("B") / n,
        verdict_a_fraction=n_a / parsed if parsed else float("nan"),
        seed=seed,
        balanced=balanced,
    )
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            result[k] = v - before.get(k, 0)
    result["records"] = records
    return result


def save_records_jsonl(records: Iterable[dict] | dict, path: str | os.PathLike) -> Path:
    """Write per-item records (or a ``judge_win_rate`` result's ``records``) as JSONL,
    atomically (temp file + ``os.replace``)."""
    if isinstance(records, dict):
        records = records["records"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
