"""Sequence log-probs: the concatenated chosen/rejected forward and the response-only LM head
give exactly what separate, full forwards give."""
import torch

from isdpo.data.collate import PreferenceCollator, pad_sequences
from isdpo.logprobs import position_ids_from_mask, selective_log_softmax, sequence_logps

PAIRS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9]},
    {"prompt_ids": [10], "chosen_ids": [11, 12, 13, 14, 15], "rejected_ids": [16]},
    {"prompt_ids": [2, 2, 2, 2], "chosen_ids": [3], "rejected_ids": [5, 6]},
]


def reference_logp(model, prompt, response):
    """log pi(response | prompt) by a plain forward of one unpadded sequence and a full log-softmax."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    token_lp = logp[torch.arange(len(targets)), targets]
    return token_lp[len(prompt) - 1 :].sum()


def test_selective_log_softmax_matches_log_softmax():
    logits = torch.randn(3, 5, 11)
    idx = torch.randint(11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, idx[..., None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, idx), expected)


def test_concatenated_forward_equals_separate_forwards(tiny_lm):
    batch = PreferenceCollator(pad_id=0)(PAIRS)
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS)
    for response_only in (True, False):
        logps, n_tok = sequence_logps(tiny_lm, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                      response_only=response_only)
        expected = [reference_logp(tiny_lm, p["prompt_ids"], p["chosen_ids"]) for p in PAIRS] + [
            reference_logp(tiny_lm, p["prompt_ids"], p["rejected_ids"]) for p in PAIRS
        ]
        torch.testing.assert_close(logps, torch.stack(expected), atol=1e-5, rtol=1e-5)
        assert n_tok.tolist() == [len(p["chosen_ids"]) for p in PAIRS] + [len(p["rejected_ids"]) for p in PAIRS]


def test_response_only_gradients_match_full_path(tiny_lm):
    batch = PreferenceCollator(pad_id=0)(PAIRS)
    grads = []
    for response_only in (True, False):
        tiny_lm.zero_grad()
        lp, _ = sequence_logps(tiny_lm, **batch, response_only=response_only)
        (lp * torch.arange(1.0, 7.0)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_lm.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_left_padding_gives_the_same_logps(tiny_lm):
    prompts = [p["prompt_ids"] for p in PAIRS]
    responses = [p["chosen_ids"] for p in PAIRS]
    right = pad_sequences(prompts, responses, pad_id=0)
    left = pad_sequences(prompts, responses, pad_id=0, left=True)
    torch.testing.assert_close(sequence_logps(tiny_lm, **right)[0], sequence_logps(tiny_lm, **left)[0],
                               atol=1e-5, rtol=1e-5)


def test_the_forward_leaves_out_the_last_position_with_the_same_numbers(tiny_lm, monkeypatch):
    """Scoring and training run the forward without the last position, which predicts nothing: bit-identical
    log-probs to the model's own full-width forward, right- and left-padded, both LM-head paths, with and without
    gradients."""
    widths = []
    real = type(tiny_lm.model).forward
    monkeypatch.setattr(type(tiny_lm.model), "forward", lambda self, *a, **k: (widths.append(k["input_ids"].shape[1]),
                                                                               real(self, *a, **k))[1])
    prompts = [p["prompt_ids"] for p in PAIRS] * 2
    responses = [p["chosen_ids"] for p in PAIRS] + [p["rejected_ids"] for p in PAIRS]
    for left in (False, True):
        batch = pad_sequences(prompts, responses, pad_id=0, left=left)
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        with torch.no_grad():
            logits = tiny_lm(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
        full = (selective_log_softmax(logits[:, :-1], ids[:, 1:]) * lm[:, 1:]).sum(-1)
        for response_only in (True, False):
            widths.clear()
            with torch.no_grad():
                scored, n_scored = sequence_logps(tiny_lm, **batch, response_only=response_only)
            trained, n_trained = sequence_logps(tiny_lm, **batch, response_only=response_only)
            assert widths == [ids.shape[1] - 1, ids.shape[1] - 1]
            assert trained.requires_grad
            torch.testing.assert_close(scored, full, atol=2e-6, rtol=0)
            assert torch.equal(scored, trained.detach()) and torch.equal(n_scored, n_trained)
            assert torch.equal(n_scored, lm[:, 1:].sum(-1).float())
