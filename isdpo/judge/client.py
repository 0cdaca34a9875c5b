"""A judge behind any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp
server, ...): bounded concurrency, retries with backoff that honour ``Retry-After``, the answer cache
(:mod:`isdpo.judge.cache`) and token/cost accounting."""
from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from isdpo.judge.cache import AnswerCache
from isdpo.judge.errors import JudgeError, JudgeHTTPError, JudgeResponseError, JudgeRetryError


def parse_retry_after(value: str | None) -> float | None:
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
        self._cache = None if cache_path is None else AnswerCache(cache_path)
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
        ra = parse_retry_after(retry_after)
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
