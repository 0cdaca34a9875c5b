"""Not paying for padding: length-grouped batches and packed (padding-free) preference batches.

Two independent tools, both exact (the same loss and gradients as the plain right-padded batch of
isdpo.data.collate, up to float rounding; tests/test_fast_path.py):

- :class:`LengthGroupedSampler` / :class:`LengthGroupedLoader`: the epoch order is still a seeded
  permutation (deterministic by seed and epoch, resumable, sharded by rank like
  isdpo.data.loader.SeededSampler), but pairs of similar padded length land in the same batch, so
  a batch is padded to a length close to each of its rows. This changes WHICH pairs share a batch
  (not the per-pair loss); with TL;DR-like lengths (prompts 100-500 tokens) it removes most of the
  padding of random batches.
- :class:`PackedPreferenceCollator`: the rows of a batch are packed into a few rows of one
  capacity (first-fit decreasing), each token keeping its own position id, with a block-diagonal
  causal mask (:func:`isdpo.logprobs.packed_attention_mask`) so no sequence sees another. With
  ``share_prompt=True`` (default) a pair is ONE segment ``[prompt | chosen | rejected]``: the
  prompt is run once for both responses, the rejected tokens take the positions right after the
  prompt and attend to the prompt and to themselves only, never to the chosen tokens (prefix
  sharing, Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
  arXiv 2410.20305). A pair then costs ``|x| + |y_w| + |y_l|`` tokens instead of
  ``2 |x| + |y_w| + |y_l|`` (plus padding). isdpo.logprobs.batch_logps reads such a batch.

Packing needs an attention implementation that takes an arbitrary 4D mask: ``sdpa`` (PyTorch's
scaled_dot_product_attention, the default of transformers 5 for Llama) or ``eager``.
FlashAttention-2/3 only take block-diagonal masks through ``position_ids`` (varlen): plain packing
(``share_prompt=False``) would work there, prompt sharing would not; neither is wired here (no GPU
to test on), isdpo.logprobs raises a clear error instead.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from isdpo.data.collate import OPTIONAL_FLOATS
from isdpo.data.loader import ResumableLoader, SeededSampler
from isdpo.distributed import rank_world


def pair_length(example: Mapping) -> int:
    """Padded length of a pair's two rows: ``|x| + max(|y_w|, |y_l|)`` (what a batch pays per row)."""
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


class LengthGroupedSampler(SeededSampler):
    """A seeded permutation in which every global batch holds pairs of similar length.

    Per epoch: a permutation seeded by ``(seed, epoch)`` is cut into mega-batches of
    ``group_batches`` global batches (``batch_size x world`` indices each); each mega-batch is
    sorted by ``lengths`` (longest first) and cut into global batches; the order of all global
    batches is then shuffled with the same generator, so long batches do not come in runs (the
    peak-memory batch can appear anywhere, as with random batches). A shorter last global batch
    stays last, so rank shards stay aligned. ``group_batches=1`` is a plain shuffle;
    ``group_batches`` >= number of batches sorts the whole epoch.

    Like SeededSampler: deterministic by (seed, epoch) in every process, ``skip`` resumes mid-epoch,
    each rank takes ``order[rank::world]`` (so rank r's j-th micro-batch is its slice of the j-th
    global batch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, shuffle: bool = True,
                 group_batches: int = 64):
        super().__init__(len(lengths), seed, shuffle)
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and group_batches ({group_batches}) must be >= 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.group_batches = batch_size, group_batches

    def indices(self) -> list[int]:
        rank, world = rank_world(launcher=False)
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        global_batch = self.batch_size * world
        mega = global_batch * self.group_batches
        batches: list[torch.Tensor] = []
        for start in range(0, self.n, mega):
            chunk = order[start : start + mega]
            # stable sort (ties keep the permutation's order): deterministic on every platform
            chunk = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
            batches.extend(chunk.split(global_batch))
        tail = [batches.pop()] if batches and len(batches[-1]) < global_batch else []
        if self.shuffle and batches:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        flat = torch.cat(batches + tail) if batches or tail else order
        return flat[: self.n // world * world][rank::world].tolist()


class LengthGroupedLoader(ResumableLoader):
    """isdpo.data.loader.ResumableLoader over a :class:`LengthGroupedSampler` (same resume state).

    ``lengths`` defaults to :func:`pair_length` of every example of ``dataset``.
    """

    def __init__(self, dataset, *, batch_size: int, seed: int, shuffle: bool = True,
                 lengths: Sequence[int] | None = None, group_batches: int = 64, accumulate: int = 1, **kwargs):
        lengths = [pair_length(e) for e in dataset] if lengths is None else lengths
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
        self.seeded_sampler = LengthGroupedSampler(lengths, batch_size, seed, shuffle=shuffle,
                                                   group_batches=group_batches)
        DataLoader.__init__(self, dataset, batch_size=batch_size, sampler=self.seeded_sampler, drop_last=True,
                            **kwargs)
        self.epoch, self.consumed, self.accumulate = 0, 0, accumulate


def _segments(example: Mapping, share_prompt: bool):
    """Segments of one pair: (tokens, positions, parts, [(slot, predictor slot, target id, which)])."""
    p, c, r = list(example["prompt_ids"]), list(example["chosen_ids"]), list(example["rejected_ids"])
    P = len(p)

    def scored(first: int, pred_first: int, n: int, which: int, skip_first: bool):
        # token at slot first+j is predicted from slot pred_first for j=0, from slot first+j-1 after
        return [(first + j, (pred_first if j == 0 else first + j - 1), which) for j in range(int(skip_first), n)]

    if share_prompt:
        tokens = p + c + r
        positions = list(range(P)) + list(range(P, P + len(c))) + list(range(P, P + len(r)))
        parts = [0] * P + [1] * len(c) + [2] * len(r)
        # without a prompt the first response token has no predictor (as in the padded path)
        targets = scored(P, P - 1, len(c), 0, P == 0) + scored(P + len(c), P - 1, len(r), 1, P == 0)
        return [(tokens, positions, parts, targets)]
    out = []
    for which, resp in ((0, c), (1, r)):
        tokens = p + resp
        out.append((tokens, list(range(len(tokens))), [0] * len(tokens), scored(P, P - 1, len(resp), which, P == 0)))
    return out


class PackedPreferenceCollator:
    """Pairs -> a packed, padding-free batch for isdpo.logprobs.batch_logps.

    Each pair gives one segment ``[prompt | chosen | rejected]`` (``share_prompt=True``) or two
    segments ``[prompt | chosen]``, ``[prompt | rejected]``; segments are packed first-fit
    decreasing into rows of ``max(row_capacity, longest segment)`` tokens (default: the longest
    segment of the batch), rounded up to ``multiple_of``. Attention costs rows x capacity^2 (a
    dense mask), so a capacity near the longest segment keeps it close to the padded batch's;
    larger capacities put more short segments in a row. Keys:

    - ``input_ids``, ``position_ids`` [R, C]: tokens and their own positions (pad slots: pad_id, 0)
    - ``pack_segment`` [R, C]: segment id of each slot (-1 for padding); ``pack_part`` [R, C]:
      0 prompt, 1 chosen, 2 rejected (with ``share_prompt``; 0 otherwise). The mask is built from
      these on the model's device (isdpo.logprobs.packed_attention_mask).
    - ``pack_pred_index``, ``pack_target_ids``, ``pack_target_seq`` [M]: for every scored response
      token, the flat slot (r * C + t) of the hidden state that predicts it, its id, and the output
      row it sums into (chosen of pair i -> i, rejected -> B + i, the order of PreferenceCollator)
    - ``pack_n_tokens`` [2B]: scored tokens per output row; ``pack_seq_lengths`` [2B]: prompt +
      response length of each row (the tokens a padded batch would hold, for throughput counts)
    - the optional per-pair floats of PreferenceCollator (reference / behaviour log-probs).

    ``sequence_logps`` of the padded batch and ``packed_sequence_logps`` of this one agree.
    """

    def __init__(self, pad_id: int, *, share_prompt: bool = True, row_capacity: int | None = None,
                 multiple_of: int = 1):
        self.pad_id, self.share_prompt = pad_id, share_prompt
        self.row_capacity, self.multiple_of = row_capacity, multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        B = len(examples)
        segs = [s for e in examples for s in _segments(e, self.share_prompt)]
        longest = max(len(s[0]) for s in segs)
        cap = max(self.row_capacity or 0, longest)
        cap = -(-cap // self.multiple_of) * self.multiple_of
        # first-fit decreasing (stable: equal lengths keep the batch order)
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(segs)), key=lambda i: -len(segs[i][0])):
            n = len(segs[i][0])
            for r, room in enumerate(free):
                if room >= n:
                    rows[r].append(i)
                    free[r] -= n
                    break
            else:
                rows.append([i])
                free.append(cap - n)
        R = len(rows)
        ids = torch.full((R, cap), self.pad_id, dtype=torch.long)
        pos = torch.zeros((R, cap), dtype=torch.long)
        seg = torch.full((R, cap), -1, dtype=torch.long)
        part = torch.zeros((R, cap), dtype=torch.long)
        pred, tgt, which = [], [], []
        for r, members in enumerate(rows):
            off = 0
            for i in members:
                tokens, positions, parts, targets = segs[i]
                n = len(tokens)
                ids[r, off : off + n] = torch.tensor(tokens, dtype=torch.long)
                pos[r, off : off + n] = torch.tensor(positions, dtype=torch.long)
                seg[r, off : off + n] = i
                part[r, off : off + n] = torch.tensor(parts, dtype=torch.long)
                pair = i if self.share_prompt else i // 2
                for slot, pslot, w in targets:
                    pred.append(r * cap + off + pslot)
                    tgt.append(tokens[slot])
                    which.append(pair + w * B)
                off += n
        which_t = torch.tensor(which, dtype=torch.long)
        batch = {
            "input_ids": ids, "position_ids": pos, "pack_segment": seg, "pack_part": part,
            "pack_pred_index": torch.tensor(pred, dtype=torch.long),
            "pack_target_ids": torch.tensor(tgt, dtype=torch.long),
            "pack_target_seq": which_t,
            "pack_n_tokens": torch.bincount(which_t, minlength=2 * B).float(),
            "pack_seq_lengths": torch.tensor(
                [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples]
                + [len(e["prompt_ids"]) + len(e["rejected_ids"]) for e in examples], dtype=torch.long),
        }
        for key in OPTIONAL_FLOATS:
            if all(key in e and e[key] is not None for e in examples):
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return batch
