"""The embedded synthetic task: a Markov-chain "language" with a known golden reward.

Why this design (see also README "The synthetic task"):

* **Data-generating process.** A first-order Markov chain over ``n_states``
  tokens. Every token has exactly ``n_successors`` allowed successors (never
  itself) with Dirichlet-distributed probabilities; every other transition has
  probability 0. Prompts are ``BOS`` + ``prompt_length`` chain tokens, responses
  the next ``response_length`` chain tokens. The reference policy is a tiny
  Hugging Face Llama SFT-trained on chain samples, so it is fluent but imperfect.
* **Golden reward** (a known function, so win rates are exact, no reward model):
  ``r(x, y) = #{t : y_t in GOOD} - unsupported_penalty * #{unsupported transitions}``
  where an unsupported transition is one the chain never produces (probability 0),
  counted from the last prompt token through the response; special tokens in a
  response count as unsupported.
* **Why over-optimization can happen.** Preference pairs are two samples of the
  SFT reference labelled by Bradley-Terry on r. Those samples are almost always
  fluent, so the pairs reveal the GOOD-token term clearly and the fluency term
  almost never. DPO at small beta is free to move mass to responses absent
  from the data (arXiv 2506.08681, section 1; docs/method.md): packing GOOD tokens through transitions the chain
  never makes raises the visible term but the fluency penalty, hidden from the
  data, makes the golden reward of such responses collapse. IS-DPO
  down-weights pairs the policy has moved away from, which is the regulariser
  under study. A term the pairs fully reveal (e.g. log-likelihood) makes every
  method over-optimize; how much of DPO's drop the hidden term causes is measured,
  not assumed (docs/method.md, section 6).
* **Held-out prompts.** A seeded hash of each prompt's chain tokens puts a fixed share of the prompt space
  (``heldout_fraction``) aside: evaluation prompts and held-out pairs are drawn from it, and no SFT sequence or
  preference pair starts with one of its prompts, so the curve is measured on prompts training never saw.

Token ids: ``0..n_states-1`` chain states, ``BOS = n_states``, ``PAD = n_states+1``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor


@dataclass
class SyntheticTask:
    n_states: int = 16
    n_successors: int = 4
    prompt_length: int = 4
    response_length: int = 10
    dirichlet_alpha: float = 1.0
    good_tokens: tuple[int, ...] = (0, 1, 2, 3)
    unsupported_penalty: float = 2.0
    seed: int = 0
    heldout_fraction: float = 0.0
    transition: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if not 1 <= self.n_successors < self.n_states:
            raise ValueError(f"task.n_successors must be in [1, task.n_states-1]; got {self.n_successors}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"task.heldout_prompt_fraction must be in [0, 1); got {self.heldout_fraction}")
        bad = [t for t in self.good_tokens if not 0 <= t < self.n_states]
        if bad:
            raise ValueError(f"task.good_tokens must be chain states in [0, {self.n_states - 1}]; got {bad}")
        # numpy's Generator has a seeded Dirichlet; torch's does not take a generator.
        rng = np.random.default_rng(self.seed)
        trans = torch.zeros(self.n_states, self.n_states)
        for s in range(self.n_states):
            others = [t for t in range(self.n_states) if t != s]
            succ = rng.choice(others, size=self.n_successors, replace=False)
            trans[s, torch.as_tensor(succ)] = torch.as_tensor(
                rng.dirichlet([self.dirichlet_alpha] * self.n_successors), dtype=torch.float32
            )
        self.transition = trans
        self.good = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.good[list(self.good_tokens)] = True

    @property
    def bos_id(self) -> int:
        return self.n_states

    @property
    def pad_id(self) -> int:
        return self.n_states + 1

    @property
    def vocab_size(self) -> int:
        return self.n_states + 2

    def sample_chain(self, n: int, length: int, generator: torch.Generator) -> Tensor:
        """``n`` chain sequences of ``length`` tokens, from a uniform start state."""
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = torch.randint(self.n_states, (n,), generator=generator)
        for t in range(1, length):
            out[:, t] = torch.multinomial(self.transition[out[:, t - 1]], 1, generator=generator).squeeze(-1)
        return out

    def heldout(self, chain_prompts: Tensor) -> Tensor:
        """[n] bool: which prompts (their ``prompt_length`` chain tokens, no BOS) lie in the held-out part of the
        prompt space. A keyed hash of the tokens, salted by the chain's seed: fixed per task instance, independent
        of every sampling stream, and about ``heldout_fraction`` of the distinct prompts."""
        if self.heldout_fraction == 0:
            return torch.zeros(len(chain_prompts), dtype=torch.bool)
        salt = str(self.seed).encode()
        cut = self.heldout_fraction * 2**64
        return torch.tensor([
            int.from_bytes(hashlib.blake2b(",".join(map(str, row)).encode(), digest_size=8, salt=salt[:16])
                           .digest(), "little") < cut
            for row in chain_prompts[:, : self.prompt_length].tolist()
        ], dtype=torch.bool)

    def sample_in_part(self, n: int, length: int, generator: torch.Generator,
                       part: Literal["train", "heldout", "any"]) -> Tensor:
        """``n`` chain sequences of ``length`` (>= prompt_length) tokens whose first ``prompt_length`` tokens are a
        prompt of ``part``: "train" (not held out), "heldout", or "any". Drawn from the chain and kept or
        rejected in order, so the result is a deterministic function of the generator's state."""
        if part == "any" or (part == "train" and self.heldout_fraction == 0):
            return self.sample_chain(n, length, generator)
        if part == "heldout" and self.heldout_fraction == 0:
            raise ValueError("held-out prompts were asked for but task.heldout_prompt_fraction is 0")
        share = self.heldout_fraction if part == "heldout" else 1 - self.heldout_fraction
        kept: list[Tensor] = []
        have, tries = 0, 0
        while have < n:
            tries += 1
            if tries > 1000:
                raise ValueError(f"could not draw {n} {part} prompts: the chain almost never reaches that part of "
                                 "the prompt space; change task.heldout_prompt_fraction")
            chunk = self.sample_chain(int((n - have) / share * 1.2) + 16, length, generator)
            mask = self.heldout(chunk)
            chunk = chunk[mask if part == "heldout" else ~mask]
            kept.append(chunk[: n - have])
            have += len(kept[-1])
        return torch.cat(kept)

    def sample_prompts(self, n: int, generator: torch.Generator,
                       part: Literal["train", "heldout", "any"] = "any") -> Tensor:
        """``[n, 1 + prompt_length]`` prompts of ``part`` (see :meth:`sample_in_part`): BOS then chain tokens."""
        chain = self.sample_in_part(n, self.prompt_length, generator, part)
        return torch.cat([torch.full((n, 1), self.bos_id, dtype=torch.long), chain], dim=1)

    def sft_examples(self, n: int, generator: torch.Generator) -> list[dict]:
        """Whole chain sequences after BOS that do not start with a held-out prompt: the SFT model learns prompts
        and responses alike."""
        chain = self.sample_in_part(n, self.prompt_length + self.response_length, generator, "train")
        return [{"prompt_ids": [self.bos_id], "response_ids": row.tolist()} for row in chain]

    def unsupported_transitions(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """Per row, how many transitions (last prompt token -> response, then within it) the chain never makes."""
        seq = torch.cat([prompts[:, -1:], responses], dim=1)
        src, dst = seq[:, :-1], seq[:, 1:]
        special = (src >= self.n_states) | (dst >= self.n_states)
        prob = self.transition[src.clamp(max=self.n_states - 1), dst.clamp(max=self.n_states - 1)]
        return ((prob == 0) | special).sum(-1)

    def golden_reward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """r(x, y) = #GOOD tokens in y - unsupported_penalty * #unsupported transitions (float, per row)."""
        good = self.good[responses.clamp(max=self.vocab_size - 1)].sum(-1).float()
        return good - self.unsupported_penalty * self.unsupported_transitions(prompts, responses).float()

    def label_pairs(
        self, prompts: Tensor, resp_a: Tensor, resp_b: Tensor, generator: torch.Generator,
        behavior_logps: tuple[Tensor, Tensor] | None = None,
    ) -> list[dict]:
        """Bradley-Terry labels on the golden reward: P(a preferred) = sigmoid(r(a) - r(b)). With
        ``behavior_logps`` (log mu of a and of b) each pair carries ``chosen_behavior_logp`` /
        ``rejected_behavior_logp``, the behaviour policy IS-DAA divides by."""
        ra, rb = self.golden_reward(prompts, resp_a), self.golden_reward(prompts, resp_b)
        a_wins = torch.rand(len(ra), generator=generator) < torch.sigmoid(ra - rb)
        out = []
        for i in range(len(ra)):
            w, l = (resp_a[i], resp_b[i]) if a_wins[i] else (resp_b[i], resp_a[i])
            pair = {"prompt_ids": prompts[i].tolist(), "chosen_ids": w.tolist(), "rejected_ids": l.tolist()}
            if behavior_logps is not None:
                la, lb = float(behavior_logps[0][i]), float(behavior_logps[1][i])
                pair["chosen_behavior_logp"], pair["rejected_behavior_logp"] = (la, lb) if a_wins[i] else (lb, la)
            out.append(pair)
        return out
