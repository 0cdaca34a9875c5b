"""isdpo.sampling's KV-cached loop draws exactly what Hugging Face's ``generate`` draws for the same seed
(left padding, EOS, several batches continuing one random stream), and sampling several settings in one
pass gives each the samples it gets alone."""
import pytest
import torch

from isdpo.data.collate import pad_sequences
from isdpo.logprobs import response_logps
from isdpo.sampling import SampleSpec, sample_each, sample_responses


def generate_reference(model, prompts, *, max_new_tokens, pad_id, eos_id=None, temperature=1.0, top_p=1.0, seed=0,
                       batch_size=256):
    """The sampler as it was: ``model.generate`` per batch, seeded once, responses cut after EOS."""
    out = []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            batch = pad_sequences(chunk, [[] for _ in chunk], pad_id, left=True)
            gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                                 temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                 min_new_tokens=None if eos_id is not None else max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=eos_id, use_cache=True)
            for row in gen[:, batch["input_ids"].shape[1]:].tolist():
                out.append(row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row)
    return out


def prompts_of(n, seed=0, vocab=23):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("eos_id", [None, 2])
@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.95), (1.0, 1.0), (1.3, 0.8)])
def test_same_samples_as_generate(tiny_lm, eos_id, temperature, top_p):
    prompts = prompts_of(40)
    kw = dict(max_new_tokens=12, pad_id=0, eos_id=eos_id, temperature=temperature, top_p=top_p, seed=5, batch_size=16)
    got = sample_responses(tiny_lm, prompts, **kw)
    assert got == generate_reference(tiny_lm, prompts, **kw)
    if eos_id is not None:  # the case is exercised: some responses stop early, at EOS
        assert any(r[-1] == eos_id and len(r) < 12 for r in got)


def test_several_settings_in_one_pass_give_each_its_own_samples(tiny_lm):
    prompts = prompts_of(30, seed=1)
    specs = [SampleSpec(0.7, 0.95, 11), SampleSpec(1.0, 1.0, 12), SampleSpec(0.5, 1.0, 13)]
    for eos_id in (None, 2):
        kw = dict(max_new_tokens=10, pad_id=0, eos_id=eos_id, batch_size=8)
        together = sample_each(tiny_lm, prompts, specs, **kw)
        alone = [sample_responses(tiny_lm, prompts, temperature=s.temperature, top_p=s.top_p, seed=s.seed, **kw)
                 for s in specs]
        assert together == alone


@pytest.mark.parametrize("eos_id,pad_id", [(None, 0), (2, 0), (2, 2)])
def test_sampling_pass_log_probs_equal_a_scoring_forward(tiny_lm, eos_id, pad_id):
    """``logps=True``: each sample's log p(y|x) under the unwarped model, from the logits it was drawn from, equals
    a separate scoring forward over (prompt, sample) to float rounding, whatever the setting's warpers; the tokens
    after EOS (padding) do not count, EOS does (also when padding and EOS are the same token)."""
    prompts = prompts_of(30, seed=2)
    specs = [SampleSpec(0.7, 0.95, 21), SampleSpec(1.0, 1.0, 22)]
    kw = dict(max_new_tokens=10, pad_id=pad_id, eos_id=eos_id, batch_size=8)
    samples, logps = sample_each(tiny_lm, prompts, specs, logps=True, **kw)
    assert samples == sample_each(tiny_lm, prompts, specs, **kw)  # the samples do not change
    if eos_id is not None:
        assert any(len(r) < 10 for r in samples[1])
    for responses, lp in zip(samples, logps):
        assert lp.shape == (len(prompts),) and lp.dtype == torch.float32
        scored = response_logps(tiny_lm, prompts, responses, pad_id=pad_id)
        torch.testing.assert_close(lp, scored, atol=1e-4, rtol=1e-5)
