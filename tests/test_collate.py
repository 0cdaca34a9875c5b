"""pad_sequences (every collator, the sampler and the scorer build their batches with it) against the plain
row-by-row padding it replaced."""
import random

import pytest
import torch

from isdpo.data.collate import pad_sequences


def padded_row_by_row(prompts, responses, pad_id, *, left=False, multiple_of=1):
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    length = -(-max(len(r) for r in rows) // multiple_of) * multiple_of
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention, loss = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        start = length - len(row) if left else 0
        ids[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, start:start + len(row)] = 1
        loss[i, start + len(p):start + len(row)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("multiple_of", [1, 8])
def test_pad_sequences_matches_row_by_row_padding(left, multiple_of):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 6))] for _ in range(30)]
    responses = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 9))] for _ in range(30)]
    responses[0] = [7]  # no empty row overall
    got = pad_sequences(prompts, responses, 0, left=left, multiple_of=multiple_of)
    want = padded_row_by_row(prompts, responses, 0, left=left, multiple_of=multiple_of)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.long and torch.equal(got[k], want[k]), k
