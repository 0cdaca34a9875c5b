"""Tests of the isdpo.judge package: the LLM-judge evaluation (paper section 5, Table 2 prompt).

The OpenAI-compatible client is tested against a real HTTP server on 127.0.0.1
(http.server in a thread) that speaks the chat-completions protocol and is
scripted per test; HFJudge against a tiny random Llama with a tokenizer trained here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from isdpo.judge import (
    JUDGE_PROMPT,
    HFJudge,
    JudgeError,
    JudgeHTTPError,
    JudgeResponseError,
    JudgeRetryError,
    OpenAIJudge,
    format_judge_prompt,
    judge_win_rate,
    parse_verdict,
    save_records_jsonl,
)
from isdpo.judge.client import parse_retry_after
from isdpo.judge.hf import letter_token_ids

SECRET = "sk-test-SECRET-4f9a1c"
_RESPONSES = re.compile(r"Response A:\n(.*)\nResponse B: (.*)\nFIRST provide", re.S)


def split_prompt(prompt: str) -> tuple[str, str]:
    """Response A and Response B of a judge prompt (the fake server's view)."""
    m = _RESPONSES.search(prompt)
    assert m, prompt
    return m.group(1), m.group(2)


def answer(letter: str) -> str:
    return f"Comparison: one is better.\nMore helpful: {letter}"


class FakeChatServer:
    """A chat-completions server on 127.0.0.1 with a per-test script.

    ``script``: a queue of (status, content_or_error, headers) consumed one per request
    first (a bytes content is sent as the raw 200 body); afterwards ``responder(prompt) -> content`` answers with 200. ``delay`` maps
    request number -> seconds to sleep before answering (for timeouts). Usage numbers
    are deterministic functions of the text and summed server-side for comparison.
    """

    def __init__(self, responder=None):
        self.responder = responder or (lambda prompt: answer("A"))
        self.script: deque = deque()
        self.delay: dict[int, float] = {}
        self.requests: list[dict] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            # Header and body go out as two writes; without TCP_NODELAY Nagle plus
            # delayed ACK adds ~40 ms to every response.
            disable_nagle_algorithm = True

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server.lock:
                    number = len(server.requests)
                    server.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                         "agent": self.headers.get("User-Agent")}
                    )
                    scripted = server.script.popleft() if server.script else None
                if number in server.delay:
                    time.sleep(server.delay[number])
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if scripted is not None and scripted[0] != 200:
                    status, message, headers = scripted
                    if message == "ECHO_AUTH":  # an error body that echoes the key
                        message = f"Incorrect API key provided: {self.headers.get('Authorization')}"
                    return self._send(status, {"error": {"message": message}}, headers)
                if scripted is not None and isinstance(scripted[1], bytes):  # a raw body (not a completion)
                    return self._send(200, scripted[1], scripted[2])
                prompt = body["messages"][0]["content"]
                content = scripted[1] if scripted is not None else server.responder(prompt)
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()) + 1}
                with server.lock:
                    server.prompt_tokens += usage["prompt_tokens"]
                    server.completion_tokens += usage["completion_tokens"]
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{number}",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {**usage, "total_tokens": sum(usage.values())},
                    },
                )

            def _send(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                headers = dict(headers or {})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # client timed out first
                    pass

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True
            # The default listen backlog (5) drops SYNs under 8 concurrent connects,
            # and the client's SYN retry costs a whole second.
            request_queue_size = 64

            def handle_error(self, request, client_address):
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)  # loopback only, free port
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        # A short poll interval so that shutdown() returns quickly.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def n(self) -> int:
        with self.lock:
            return len(self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # A proxy set in the environment must not capture loopback requests.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    with FakeChatServer() as s:
        yield s


def make_judge(server, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("max_concurrency", 4)
    return OpenAIJudge(server.base_url, "gpt-4o-mini", **kw)


def items(n=16):
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(n)]
    policy = [f"a long and detailed helpful answer number {i}" for i in range(n)]
    reference = [f"short {i}" for i in range(n)]
    return prompts, policy, reference


# ---------------------------------------------------------------------------
# prompt and parsing
# ---------------------------------------------------------------------------


def test_prompt_is_table2():
    """The template is the paper's Table 2 text with the three placeholders."""
    filled = format_judge_prompt("H", "RA", "RB")
    assert filled.startswith("For the following dialogue history to a chatbot, which response is more helpful?\n")
    assert "Dialogue history:\nH\nResponse A:\nRA\nResponse B: RB\n" in filled
    assert 'state only "A" or "B" to indicate which response is more helpful.' in filled
    assert filled.endswith('Comparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">')
    assert set(re.findall(r"\{(\w+)\}", JUDGE_PROMPT)) == {"history", "response_a", "response_b"}
    # Braces in the data are not format fields; surrounding whitespace is stripped.
    assert "Response A:\n{x}\n" in format_judge_prompt("\n\nHuman: hi", " {x} ", "y")


def test_prompt_matches_the_papers_table2_as_docs_method_quotes_it():
    """Word for word (line wraps aside) the Table 2 block quoted in docs/method.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    block = text.split("As the paper prints")[1].split("```text\n", 1)[1].split("```", 1)[0]
    words = " ".join(block.split())
    ours = " ".join(
        JUDGE_PROMPT.replace("{history}", "<dialogue history>")
        .replace("{response_a}", "<Response A>")
        .replace("{response_b}", "<Response B>")
        .split()
    )
    assert len(words) > 300 and ours == words


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Comparison: A is detailed.\nMore helpful: A", "A"),
        ("Comparison: B is polite.\nMore helpful: B", "B"),
        ("More helpful: \"B\"", "B"),
        ("More helpful: 'A'", "A"),
        ("More helpful: “A”", "A"),
        ("**More helpful:** B", "B"),
        ("**More helpful: A**", "A"),
        ("### More helpful: `B`", "B"),
        ("more HELPFUL:a", "A"),
        ("MORE HELPFUL:   b.  ", "B"),
        ("More helpful: [A]", "A"),
        ("More helpful: Response B", "B"),
        ("Comparison: x\r\n\r\nMore helpful: A\r\n", "A"),
        ("  More helpful:\tB\n\n", "B"),
        ("Comparison: Response A is more helpful: it answers.\nMore helpful: B", "B"),
        ("A", "A"),
        ("Comparison: both fine but B is clearer.\nB", "B"),
        ("Comparison: B is clearer. More helpful: B", "B"),
        ("Comparison: B is clearer. More helpful: \"B\".", "B"),
        ("Comparison: A is more helpful: it answers the question.", None),
        ("Comparison: More helpful: A. Also more helpful: B", None),
        # ambiguous or unparseable: never guessed
        ("More helpful: A or B", None),
        ("More helpful: Both", None),
        ("More helpful: C", None),
        ("More helpful: A, because B is rude", None),
        ("More helpful: A\nMore helpful: B", None),
        ("More helpful: neither", None),
        ("More helpful:", None),
        ("Comparison: A is better than B.", None),
        ("I think A is more helpful", None),
        ("", None),
        (None, None),
        ("AB", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_parse_verdict_repeated_agreeing_labels():
    assert parse_verdict("More helpful: A\n\nMore helpful: **A**") == "A"


def test_retry_after_parsing():
    assert parse_retry_after(None) is None
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: no wait
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(future) <= 31


# ---------------------------------------------------------------------------
# win rate: position swapping
# ---------------------------------------------------------------------------


def test_always_a_judge_gives_half_when_balanced(server):
    """A judge with pure position bias ("A" always) scores exactly 0.5 with balanced
    positions, and in general exactly the fraction of items with the policy at A."""
    prompts, policy, reference = items(16)
    judge = make_judge(server)
    result = judge_win_rate(judge, prompts, policy, reference, seed=3)
    assert result["n"] == 16 and result["n_unparseable"] == 0
    assert result["swap_fraction"] == 0.5
    assert result["win_rate"] == 0.5 and result["n_wins"] == 8 and result["n_losses"] == 8
    assert result["verdict_a_fraction"] == 1.0
    # The swap is per item and seeded: both positions occur, in a seed-dependent order.
    positions = [r["policy_position"] for r in result["records"]]
    assert positions == [r["policy_position"] for r in judge_win_rate(judge, prompts, policy, reference, seed=3)["records"]]
    assert positions != [r["policy_position"] for r in judge_win_rate(judge, prompts, policy, reference, seed=4)["records"]]
    # Independent coins: swap_fraction near 0.5, win rate == fraction at A exactly.
    prompts, policy, reference = items(40)
    for seed in range(3):
        r = judge_win_rate(judge, prompts, policy, reference, seed=seed, balanced=False)
        assert 0.2 <= r["swap_fraction"] <= 0.8
        assert r["win_rate"] == pytest.approx(1 - r["swap_fraction"])
        assert r["n_wins"] == r["n_policy_at_a"]


def test_length_judge_gives_full_win_rate_whatever_the_position():
    """A judge that picks the longer response: the (longer) policy wins every item
    from both positions, so the swap is undone correctly."""

    def longer(prompt):
        a, b = split_prompt(prompt)
        return answer("A" if len(a) > len(b) else "B")

    with FakeChatServer(longer) as server:
        prompts, policy, reference = items(16)
        result = judge_win_rate(make_judge(server), prompts, policy, reference, seed=0)
        assert result["win_rate"] == 1.0 and result["n_wins"] == 16
        assert result["swap_fraction"] == 0.5
        assert {r["policy_position"] for r in result["records"]} == {"A", "B"}
        sent = {}
        for req in server.requests:
            prompt = req["body"]["messages"][0]["content"]
            sent[int(re.search(r"question (\d+)\?", prompt).group(1))] = split_prompt(prompt)
        for r in result["records"]:
            assert r["verdict"] == r["policy_position"] and r["policy_won"] is True
            # The record says where the policy was, and the prompt sent agrees.
            a, b = sent[r["index"]]
            assert (a, b) == ((r["policy"], r["reference"]) if r["policy_position"] == "A" else (r["reference"], r["policy"]))
        # The reverse: shorter policy responses lose everything.
        result = judge_win_rate(make_judge(server), prompts, reference, policy, seed=0)
        assert result["win_rate"] == 0.0 and result["n_losses"] == 16


def test_malformed_answers_are_unparseable_not_wins_or_losses():
    bad = {1: "I cannot decide.", 4: "More helpful: C", 6: "", 9: "More helpful: A or B"}

    def responder(prompt):
        i = int(re.search(r"question (\d+)\?", prompt).group(1))
        return bad.get(i, answer("A"))

    with FakeChatServer(responder) as server:
        prompts, policy, reference = items(12)
        result = judge_win_rate(make_judge(server), prompts, policy, reference, seed=1)
    assert result["n_unparseable"] == 4
    assert result["n_wins"] + result["n_losses"] == 8
    good = [r for r in result["records"] if r["index"] not in bad]
    assert result["n_wins"] == sum(r["policy_position"] == "A" for r in good)
    assert result["win_rate"] == result["n_wins"] / 8
    assert result["win_rate_conservative"] == result["n_wins"] / 12
    for r in result["records"]:
        if r["index"] in bad:
            assert r["verdict"] is None and r["policy_won"] is None and r["raw"] == bad[r["index"]]


def test_records_saved_as_jsonl(server, tmp_path):
    prompts, policy, reference = items(4)
    result = judge_win_rate(make_judge(server), prompts, policy, reference)
    path = save_records_jsonl(result, tmp_path / "out" / "judge.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == result["records"]
    assert set(rows[0]) == {"index", "prompt", "policy", "reference", "policy_position", "raw", "verdict", "policy_won"}


def test_balanced_positions_with_odd_count(server):
    prompts, policy, reference = items(7)
    for seed in range(4):
        n_a = judge_win_rate(make_judge(server), prompts, policy, reference, seed=seed)["n_policy_at_a"]
        assert n_a in (3, 4)


def test_length_mismatch_rejected(server):
    with pytest.raises(ValueError, match="same length"):
        judge_win_rate(make_judge(server), ["x"], ["a", "b"], ["c"])


# ---------------------------------------------------------------------------
# client: cache, retries, key hygiene, accounting
# ---------------------------------------------------------------------------


def test_cache_prevents_second_request(server, tmp_path):
    cache = tmp_path / "judge.sqlite"
    prompts, policy, reference = items(8)
    judge = make_judge(server, cache_path=cache)
    first = judge_win_rate(judge, prompts, policy, reference, seed=0)
    assert server.n == 8 and first["n_requests"] == 8 and first["n_cached"] == 0
    second = judge_win_rate(judge, prompts, policy, reference, seed=0)
    assert server.n == 8  # nothing sent
    assert second["n_cached"] == 8 and second["n_requests"] == 0
    assert second["cost_usd"] == 0 and second["prompt_tokens"] == 0
    assert [r["raw"] for r in second["records"]] == [r["raw"] for r in first["records"]]
    judge.close()
    # A new judge object on the same file: still nothing sent.
    again = make_judge(server, cache_path=cache)
    third = judge_win_rate(again, prompts, policy, reference, seed=0)
    assert server.n == 8 and third["n_cached"] == 8
    assert third["win_rate"] == first["win_rate"]
    # Another model, or another seed (other positions, so other prompts), is a miss.
    other = OpenAIJudge(server.base_url, "other-model", cache_path=cache)
    other.judge_one(format_judge_prompt(prompts[0], policy[0], reference[0]))
    assert server.n == 9
    # Identical prompts in one call are sent once.
    fresh = make_judge(server)
    fresh.judge(["same prompt"] * 5)
    assert server.n == 10 and fresh.stats()["n_cached"] == 4


def test_429_then_200_is_retried(server):
    server.script.extend([(429, "rate limited", {}), (200, answer("B"), {})])
    judge = make_judge(server)
    assert judge.judge_one("p") == answer("B")
    assert server.n == 2 and judge.stats()["n_retries"] == 1


def test_retry_after_is_honoured(server):
    server.script.extend([(429, "slow down", {"Retry-After": "1"}), (200, answer("A"), {})])
    judge = make_judge(server, backoff_base_s=0.01)
    t0 = time.monotonic()
    assert judge.judge_one("p") == answer("A")
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 2.5  # waited what the server asked, not the 10 ms backoff
    # A huge Retry-After is capped.
    server.script.extend([(503, "down", {"Retry-After": "3600"}), (200, answer("A"), {})])
    judge = make_judge(server, retry_after_max_s=0.05)
    t0 = time.monotonic()
    judge.judge_one("q")
    assert time.monotonic() - t0 < 1.0


def test_500_then_200_is_retried(server):
    server.script.extend([(500, "oops", {}), (502, "bad gateway", {}), (200, answer("A"), {})])
    judge = make_judge(server)
    assert judge.judge_one("p") == answer("A")
    assert server.n == 3 and judge.stats()["n_retries"] == 2


def test_400_raises_without_retry(server):
    server.script.append((400, "invalid model", {}))
    judge = make_judge(server)
    with pytest.raises(JudgeHTTPError, match="HTTP 400.*invalid model") as info:
        judge.judge_one("p")
    assert info.value.status == 400 and server.n == 1 and judge.stats()["n_retries"] == 0


def test_retries_exhausted(server):
    server.script.extend([(500, "down", {})] * 3)
    judge = make_judge(server, max_retries=2)
    with pytest.raises(JudgeRetryError, match="3 attempts.*HTTP 500"):
        judge.judge_one("p")
    assert server.n == 3


def test_timeout_is_retried(server):
    server.delay[0] = 1.0  # first answer arrives after the client gave up
    judge = make_judge(server, timeout_s=0.3)
    assert judge.judge_one("p") == answer("A")
    assert server.n == 2 and judge.stats()["n_retries"] == 1


def test_connection_refused_is_retried_then_raises():
    with FakeChatServer() as s:
        url = s.base_url
    judge = OpenAIJudge(url, "m", max_retries=2, backoff_base_s=0.01)  # port now closed
    with pytest.raises(JudgeRetryError, match="3 attempts"):
        judge.judge_one("p")
    assert judge.stats()["n_retries"] == 2


def test_api_key_sent_but_never_stored_or_shown(server, tmp_path):
    cache = tmp_path / "c" / "judge.sqlite"
    judge = make_judge(server, cache_path=cache)
    prompts, policy, reference = items(4)
    result = judge_win_rate(judge, prompts, policy, reference)
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert SECRET not in repr(judge) and SECRET not in str(judge)
    assert SECRET not in json.dumps(result)
    assert all(SECRET not in repr(v) for v in vars(judge).values())
    # Nor does the openai client hold it: it goes in each request's header only.
    assert judge._client.api_key != SECRET and SECRET not in repr(vars(judge._client))
    judge.close()
    for f in cache.parent.iterdir():
        assert SECRET.encode() not in f.read_bytes()
    # A server that echoes the key in its error body: the exception does not carry it.
    server.script.append((401, "ECHO_AUTH", {}))
    with pytest.raises(JudgeHTTPError) as info:
        make_judge(server).judge_one("p")
    assert info.value.status == 401 and "Incorrect API key" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_missing_key_env_and_no_auth(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeError, match="OPENAI_API_KEY is not set"):
        make_judge(server).judge_one("p")
    assert server.n == 0
    assert make_judge(server, api_key_env=None).judge_one("p") == answer("A")
    assert server.requests[-1]["auth"] is None


def test_token_and_cost_accounting(server):
    judge = make_judge(server, price_per_1k_input=0.5, price_per_1k_output=2.0, max_concurrency=8)
    prompts, policy, reference = items(24)
    result = judge_win_rate(judge, prompts, policy, reference)
    assert result["prompt_tokens"] == server.prompt_tokens > 0
    assert result["completion_tokens"] == server.completion_tokens > 0
    expected = server.prompt_tokens / 1000 * 0.5 + server.completion_tokens / 1000 * 2.0
    assert result["cost_usd"] == pytest.approx(expected)
    assert result["n_requests"] == 24 and result["n_cached"] == 0
    # The request carries the configured model and sampling parameters.
    body = server.requests[0]["body"]
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.0 and body["max_tokens"] == 128
    assert server.requests[0]["path"] == "/v1/chat/completions"
    # Cumulative stats keep growing across calls; the result reports this call's share.
    judge_win_rate(judge, prompts, policy, reference, seed=1)
    assert judge.stats()["prompt_tokens"] == server.prompt_tokens


def test_requests_go_through_the_openai_client_with_its_retries_off(server):
    """The HTTP layer is the official openai client (its user agent), and its own retries are
    off: our loop is the only one, so the server sees exactly max_retries + 1 attempts."""
    judge = make_judge(server)
    assert judge.judge_one("p") == answer("A")
    assert server.requests[0]["agent"].startswith("OpenAI/Python")
    server.script.extend([(500, "down", {})] * 5)
    with pytest.raises(JudgeRetryError, match="1 attempts"):
        make_judge(server, max_retries=0).judge_one("q")
    assert server.n == 2


def test_missing_openai_package_names_the_extra(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    with pytest.raises(JudgeError, match=r"pip install isdpo\[judge\]"):
        make_judge(server)


def test_non_json_and_malformed_200_raise_response_error(server):
    server.script.append((200, b"<html>gateway page</html>", {"Content-Type": "text/html"}))
    with pytest.raises(JudgeResponseError, match="not JSON.*gateway page"):
        make_judge(server).judge_one("p")
    server.script.append((200, b'{"id": "x", "object": "chat.completion"}', {}))
    with pytest.raises(JudgeResponseError, match=r"without choices\[0\].message"):
        make_judge(server).judge_one("q")
    # A completion without usage still answers; its tokens count as 0 and are flagged.
    server.script.append((200, json.dumps({"id": "y", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": answer("B")}, "finish_reason": "stop"}]}).encode(), {}))
    judge = make_judge(server)
    assert judge.judge_one("r") == answer("B")
    assert judge.stats()["n_missing_usage"] == 1 and judge.stats()["prompt_tokens"] == 0


def test_api_key_never_logged_even_at_debug(server, caplog):
    """The openai and httpx loggers at DEBUG (e.g. OPENAI_LOG=debug, hydra.verbose): no key in the log."""
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    judge = make_judge(server)
    judge.judge_one("p")
    server.script.append((401, "ECHO_AUTH", {}))
    with pytest.raises(JudgeHTTPError):
        judge.judge_one("q")
    assert server.requests[-1]["auth"] == f"Bearer {SECRET}"
    assert caplog.records and SECRET not in caplog.text


def test_concurrency_is_bounded():
    active = 0
    peak = 0
    lock = threading.Lock()

    def slow(prompt):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return answer("A")

    with FakeChatServer(slow) as server:
        judge = make_judge(server, max_concurrency=3)
        judge.judge([f"p{i}" for i in range(12)])
    assert 2 <= peak <= 3


# ---------------------------------------------------------------------------
# HFJudge: tiny random Llama, tokenizer trained here
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [format_judge_prompt(f"Human: q{i}", f"answer {i}", "other") + "\nMore helpful: A" for i in range(50)]
    raw.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def test_letter_token_ids_cover_both_spellings(tiny_lm):
    _, tokenizer = tiny_lm
    ids_a = letter_token_ids(tokenizer, "A")
    # Byte-level BPE: "A" and "ĠA" (" A") are different tokens; both count.
    assert len(ids_a) == 2
    assert {tokenizer.convert_ids_to_tokens(i) for i in ids_a} == {"A", "ĠA"}
    assert not set(ids_a) & set(letter_token_ids(tokenizer, "B"))


def test_hf_judge_returns_a_or_b_with_sane_probabilities(tiny_lm):
    import math

    model, tokenizer = tiny_lm
    judge = HFJudge(model, tokenizer, batch_size=3)
    assert not judge.use_chat_template
    prompts, policy, reference = items(7)
    judge_prompts = [format_judge_prompt(p, y, r) for p, y, r in zip(prompts, policy, reference)]
    scores = judge.score(judge_prompts)
    for s in scores:
        assert 0 < s["p_a"] < 1 and 0 < s["p_b"] < 1 and s["p_a"] + s["p_b"] <= 1 + 1e-6
        assert s["p_a_given_ab"] == pytest.approx(s["p_a"] / (s["p_a"] + s["p_b"]))
        assert math.log(s["p_a"]) == pytest.approx(s["logp_a"])
    verdicts = judge.judge(judge_prompts)
    assert set(verdicts) <= {"A", "B"}
    assert verdicts == ["A" if s["p_a"] >= s["p_b"] else "B" for s in scores]
    # Padding does not change the answer: batched == one at a time.
    alone = [HFJudge(model, tokenizer, batch_size=1).score([p])[0] for p in judge_prompts]
    for s, t in zip(scores, alone):
        assert s["logp_a"] == pytest.approx(t["logp_a"], abs=1e-4)
        assert s["logp_b"] == pytest.approx(t["logp_b"], abs=1e-4)
    # Cross-check one prompt against a direct forward over the full vocabulary.
    import torch

    ids = tokenizer(judge.build_text(judge_prompts[0]))["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    assert scores[0]["logp_a"] == pytest.approx(float(torch.logsumexp(logp[judge.ids_a], 0)), abs=1e-4)
    # In the win-rate loop: never unparseable, zero cost.
    result = judge_win_rate(judge, prompts, policy, reference)
    assert result["n_unparseable"] == 0 and result["cost_usd"] == 0.0
    assert result["n_wins"] + result["n_losses"] == 7


def test_hf_judge_uses_chat_template(tiny_lm):
    model, tokenizer = tiny_lm
    tokenizer = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
    )
    judge = HFJudge(model, tokenizer)
    assert judge.use_chat_template
    text = judge.build_text("PROMPT")
    assert text == "<s>[user] PROMPT</s><s>[assistant] More helpful:"
    assert judge.judge([format_judge_prompt("h", "a", "b")])[0] in {"A", "B"}
    assert HFJudge(model, tokenizer, use_chat_template=False).build_text("P") == "P\nMore helpful:"
