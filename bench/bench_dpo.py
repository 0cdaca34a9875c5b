#!/usr/bin/env python
"""DPO training throughput and peak memory: isdpo vs TRL's DPOTrainer, same model, pairs and batches.

    python bench/bench_dpo.py                                  # both models, default sizes (minutes on 2 cores)
    python bench/bench_dpo.py --model tiny --steps 30 --repeats 3
    python bench/bench_dpo.py --model smollm2 --steps 6 --repeats 2
    python bench/bench_dpo.py --model tiny --ablations         # + each fast-path switch alone

What runs. One process runs every configuration in turn, interleaved (rep 1: A B C ..., rep 2:
... C B A), so machine noise hits all sides alike; ratios are of medians over the repeats.

- isdpo: the experiment's own path. PreferenceModule (one concatenated forward per model through
  isdpo.logprobs, the loss of isdpo.losses.build_loss("dpo")) under the Lightning Trainer built by
  isdpo.trainer.build_trainer, fed by isdpo.data.loader.ResumableLoader + PreferenceCollator:
  what stage=align runs, minus evaluation and checkpointing. (The Trainer, not a bare loop,
  because TRL is measured with its Trainer too: each framework's per-step overhead is part of it.)
  The fast-path switches (isdpo.logprobs.batch_logps, fused AdamW) are PreferenceModule's own
  arguments, and the module frees gradients right after the optimizer step (Lightning frees them
  only after the NEXT step's forward: +12% peak memory on SmolLM2 otherwise).
- TRL 1.16: DPOTrainer (loss_type sigmoid = DPO) on the same text, tokenised by TRL itself (the
  bench checks that TRL's token ids equal isdpo's), the same batch size, the same batch order
  (a fixed pre-shuffled order on both sides: TRL's sampler is replaced by a sequential one).
  Both sides report the same mean training loss (to 6 digits) at equal settings.

Equal settings on both sides: fp32 weights and compute, no gradient checkpointing, fused AdamW
(TRL's default optimizer; isdpo's task.train.fused_adamw; "-plainadam" ablations run both sides
with the plain one), lr 1e-6, constant
schedule, gradient clipping at 1.0, no dropout, beta 0.1, the same threads. TRL's shipped
defaults also turn on bf16 autocast and gradient checkpointing; both are off here (as in isdpo's
CPU hardware config): ``--extras`` adds TRL exactly as shipped.

Configurations (ref = reference log-probs):
  trl/online        TRL defaults: online reference, right-padded batches in random order
  isdpo/online      same settings as trl/online (online ref, same padded batches)
  trl/precomputed   TRL with precompute_ref_log_probs=True
  isdpo/precomputed isdpo with reference log-probs from isdpo.ref_cache (same padded batches)
  isdpo/fast        the whole fast path: precomputed ref + length-grouped batches + packed rows with
                    the prompt shared by chosen and rejected
  isdpo/fast-online the same with an online reference
  (--ablations: each switch alone on top of isdpo/online, the slow variants (separate
   chosen/rejected forwards, full-vocabulary logits), gradient checkpointing, plain AdamW;
   --compile: torch.compile of the decoder)

Measured: the steps after the warm-up steps, from the end of the last warm-up step to the end of
the last step (data loading, forward, backward, clipping, optimizer, logging: all of it), both by
wall clock and by the CPU time of the main thread. With --threads 1 (default) every op runs on the
main thread, so CPU time is the work done and barely moves when other processes share the cores;
wall time does (x2 swings were seen on the shared 2-core machine), so the CPU-time ratios are the
robust ones there (on a quiet machine both agree). pairs/s; tokens/s counted as prompt+response
tokens of both rows of every pair without padding (the same count for every configuration,
whatever it pads or shares); peak memory = peak RSS of the process during the configuration's run
(models, optimizer state, activations, data) minus its RSS just before (after gc + malloc_trim),
sampled every 5 ms by a thread (on GPU: torch.cuda.max_memory_allocated). One untimed pre-warm
run of each side comes first (lazy initialisation, first allocations). Reference precompute time is
reported apart (it is paid once per data set and reference; isdpo caches it on disk across runs).

Data: a TL;DR-like spread of lengths: prompts uniform in [100, 500] tokens, each response uniform
in [20, 100], times a scale. These CPUs are slow, so the defaults scale down and keep the spread:
tiny 0.5 ([50, 250] and [10, 50]), SmolLM2 0.2 ([20, 100] and [4, 20]); --scale 1 gives the full
lengths. Text is random words that are one token each (EOS appended by TRL's rule), so token
lengths are exact.

On a GPU: ``--bf16`` (bf16 autocast on both sides), ``--scale 1`` and bigger ``--batch``/``--steps``;
time is then wall clock with a CUDA sync at every step end, memory torch.cuda.max_memory_allocated,
and the "cpu" columns mean nothing.

Results: a table on stdout and JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"
GGUF_DIR = ROOT / "models" / "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

BETA, LR, CLIP = 0.1, 1e-6, 1.0
BF16 = False  # --bf16: bf16 autocast on both sides (Lightning "bf16-mixed", TRL bf16=True); meant for GPUs


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    name: str
    side: str                      # isdpo | trl
    ref: str = "online"            # online | precomputed
    grouped: bool = False          # isdpo: length-grouped batches
    packing: bool = False          # isdpo: packed rows, prompt shared by chosen and rejected
    share_prompt: bool = True      # isdpo packing: one segment per pair (True) or per row (False)
    response_only: bool = True     # isdpo: LM head at response positions only
    concatenated: bool = True      # isdpo: one forward for chosen+rejected (False: two)
    fused_adam: bool = True        # isdpo: torch.optim.AdamW(fused=True), as TRL's default optimizer
    compile: bool = False          # isdpo: torch.compile the decoder
    grad_ckpt: bool = False        # both: gradient checkpointing
    trl_optim: str = "adamw_torch_fused"  # trl: TRL's default optimizer
    trl_bf16: bool = False         # trl: bf16 autocast (TRL's shipped default is True)


MAIN = [
    RunSpec("trl/online", "trl"),
    RunSpec("isdpo/online", "isdpo"),
    RunSpec("trl/precomputed", "trl", ref="precomputed"),
    RunSpec("isdpo/precomputed", "isdpo", ref="precomputed"),
    RunSpec("isdpo/fast", "isdpo", ref="precomputed", grouped=True, packing=True),
    RunSpec("isdpo/fast-online", "isdpo", grouped=True, packing=True),
]
ABLATIONS = [
    RunSpec("trl/online-plainadam", "trl", trl_optim="adamw_torch"),
    RunSpec("isdpo/online-plainadam", "isdpo", fused_adam=False),
    RunSpec("isdpo/online+grouped", "isdpo", grouped=True),
    RunSpec("isdpo/online+packed", "isdpo", packing=True),
    RunSpec("isdpo/online+packed-noshare", "isdpo", packing=True, share_prompt=False),
    RunSpec("isdpo/online-split", "isdpo", concatenated=False),
    RunSpec("isdpo/online-fulllogits", "isdpo", response_only=False),
    RunSpec("isdpo/online+gradckpt", "isdpo", grad_ckpt=True),
    RunSpec("trl/online+gradckpt", "trl", grad_ckpt=True),
]
COMPILE = [RunSpec("isdpo/online+compile", "isdpo", compile=True),
           RunSpec("isdpo/fast+compile", "isdpo", ref="precomputed", grouped=True, packing=True, compile=True)]
EXTRAS = [RunSpec("trl/shipped-defaults", "trl", grad_ckpt=True, trl_bf16=True)]


@dataclass
class ModelSpec:
    name: str
    prompt: tuple[int, int]
    response: tuple[int, int]
    batch: int
    steps: int
    warmup: int
    repeats: int
    scale: float


#: TL;DR-like lengths (prompts 100-500 tokens, responses 20-100), multiplied by ``scale``: on these
#: CPUs the defaults are scaled down (the spread kept) to fit minutes; --scale 1 gives the full lengths.
MODELS = {
    "tiny": ModelSpec("tiny", (100, 500), (20, 100), batch=4, steps=10, warmup=2, repeats=3, scale=0.5),
    "smollm2": ModelSpec("smollm2", (100, 500), (20, 100), batch=2, steps=3, warmup=1, repeats=1, scale=0.2),
    # GPU runs (bench/gpu_check.sh): real architectures at full TL;DR lengths, randomly initialised
    "smollm2-arch": ModelSpec("smollm2-arch", (100, 500), (20, 100), batch=8, steps=8, warmup=3, repeats=1, scale=1.0),
    "llama-1b": ModelSpec("llama-1b", (100, 500), (20, 100), batch=8, steps=6, warmup=3, repeats=1, scale=1.0),
}

#: Architectures of real models, randomly initialised: throughput, memory and MFU do not depend on trained
#: weights, so no hub download is needed (the GPU machine has no network). The bench's word-level tokenizer
#: uses the first ~2000 ids of the vocabulary; the embedding and LM head keep the model's real size.
ARCHS = {
    # HuggingFaceTB/SmolLM2-135M's config.json
    "smollm2-arch": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=2048),
    # meta-llama/Llama-3.2-1B's config.json (without its long-context RoPE scaling: rows here are < 1k tokens)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=2048),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------
# memory and time
# ------------------------------------------------------------------------------------------------

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def release_memory():
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # hand freed heap pages back, so the next run's RSS baseline is its own


class RSSMonitor:
    """Peak RSS above the RSS at start, sampled by a thread (torch's CPU allocator has no peak counter)."""

    def __init__(self, interval: float = 0.005):
        self.proc, self.interval = psutil.Process(), interval
        self.baseline = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        if torch.cuda.is_available():
            return (torch.cuda.max_memory_allocated() - self.cuda_base) / 2**20
        return (self.peak - self.baseline) / 2**20


# ------------------------------------------------------------------------------------------------
# data, tokenizers, models
# ------------------------------------------------------------------------------------------------


def tiny_tokenizer(seed: int = 0, n_words: int = 2000):
    """A word-level tokenizer trained on the spot with `tokenizers` on a random-word corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(n_words)})
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(400)] + words
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    return tok, words


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = CACHE / "smollm2"
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # words that are exactly one token with a leading space, so " w1 w2 ... wn" is n tokens
    cands = [t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha()
             and t[1:].islower() and len(t) >= 4]
    cands.sort()
    enc = tok([" " + w for w in cands], add_special_tokens=False)["input_ids"]
    words = [w for w, ids in zip(cands, enc) if len(ids) == 1][:5000]
    return tok, words


def ensure_smollm2() -> bool:
    """Float weights of the GGUF file, saved once as safetensors (de-quantising the GGUF takes minutes)."""
    path = CACHE / "smollm2"
    if (path / "model.safetensors").exists():
        return True
    if not (GGUF_DIR / GGUF_FILE).exists():
        return False
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"[bench] de-quantising {GGUF_FILE} once into {path} ...", flush=True)
    m = AutoModelForCausalLM.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = LlamaForCausalLM(cfg)
    clean.load_state_dict(m.state_dict())
    clean.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return True


def make_texts(words, n: int, spec: ModelSpec, scale: float, seed: int):
    rng = random.Random(seed)

    def span(lo_hi):
        lo, hi = (max(1, round(v * scale)) for v in lo_hi)
        return " " + " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": span(spec.prompt), "chosen": span(spec.response), "rejected": span(spec.response)}
            for _ in range(n)]


def tokenize_like_trl(tok, texts):
    """TRL's tokenisation of prompt/chosen/rejected text (EOS appended to responses), as token-id pairs."""
    eos = tok.eos_token
    out = []
    for t in texts:
        p = tok(t["prompt"])["input_ids"]
        c = tok(t["prompt"] + t["chosen"] + eos)["input_ids"]
        r = tok(t["prompt"] + t["rejected"] + eos)["input_ids"]
        assert c[: len(p)] == p and r[: len(p)] == p, "prompt is not a token prefix"
        out.append({"prompt_ids": p, "chosen_ids": c[len(p):], "rejected_ids": r[len(p):]})
    return out


class Bench:
    """One model's data, tokenizer and weights (each run builds fresh models from the same weights)."""

    def __init__(self, model: str, spec: ModelSpec, scale: float, seed: int, arch_overrides: dict | None = None):
        from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

        self.model, self.spec = model, spec
        if model in ARCHS:
            self.tok, words = tiny_tokenizer(seed)
            torch.manual_seed(seed)
            self.config = LlamaConfig(**{**ARCHS[model], **(arch_overrides or {})}, pad_token_id=self.tok.pad_token_id)
            with torch.device(DEVICE):  # initialising a 1B model on the CPU takes a while
                m = LlamaForCausalLM(self.config)
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
            del m
            self.model_dir = None
        elif model == "tiny":
            self.tok, words = tiny_tokenizer(seed)
            torch.manual_seed(seed)
            # conf/model/tiny.yaml's architecture; longer positions for TL;DR-length rows
            cfg = LlamaConfig(vocab_size=len(self.tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                              tie_word_embeddings=False, pad_token_id=self.tok.pad_token_id)
            m = LlamaForCausalLM(cfg)
            self.state = {k: v.clone() for k, v in m.state_dict().items()}
            self.config = cfg
            self.model_dir = None
        else:
            self.tok, words = smollm2_tokenizer()
            self.model_dir = str(CACHE / "smollm2")
        self.n_pairs = spec.batch * (spec.warmup + spec.steps)
        self.texts = make_texts(words, self.n_pairs, spec, scale, seed)
        self.examples = tokenize_like_trl(self.tok, self.texts)
        self.pad_id = self.tok.pad_token_id
        self.seq_tokens = [len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"])
                           for e in self.examples]
        from isdpo.flops import matmul_params, peak_flops

        with torch.device("meta"):  # the parameter count without the weights
            cfg = self.config if self.model_dir is None else AutoConfig.from_pretrained(self.model_dir)
            self.n_matmul = matmul_params(LlamaForCausalLM(cfg))
        self.peak = (peak_flops(torch.cuda.get_device_name(), "bf16-mixed" if BF16 else "32-true")
                     if torch.cuda.is_available() else None)

    def mfu(self, tokens_per_s: float, *, online_ref: bool, shared_prompt: bool = False) -> float | None:
        """Model-FLOPs utilisation as isdpo.flops counts it: 6N per computed token (+2N with the reference
        run online); a shared prompt is computed once per pair. None without a known peak (CPU)."""
        if not self.peak or not tokens_per_s:
            return None
        prompts = sum(len(e["prompt_ids"]) for e in self.examples)
        computed = (sum(self.seq_tokens) - prompts) / sum(self.seq_tokens) if shared_prompt else 1.0
        return (6 + (2 if online_ref else 0)) * self.n_matmul * tokens_per_s * computed / self.peak

    def build_model(self):
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        if self.model_dir is None:
            with torch.device(DEVICE):
                m = LlamaForCausalLM(self.config)
            m.load_state_dict(self.state)
        else:
            m = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        return m.to(DEVICE)

    def describe(self) -> dict:
        ex = self.examples
        pl = [len(e["prompt_ids"]) for e in ex]
        rl = [len(e["chosen_ids"]) for e in ex] + [len(e["rejected_ids"]) for e in ex]
        B = self.spec.batch
        padded = sum(2 * B * max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                                 for e in ex[i:i + B]) for i in range(0, len(ex), B))
        return {"pairs": len(ex), "prompt_tokens": [min(pl), statistics.median(pl), max(pl)],
                "response_tokens": [min(rl), statistics.median(rl), max(rl)],
                "padding_fraction_random_batches": round(1 - sum(self.seq_tokens) / padded, 3)}


# ------------------------------------------------------------------------------------------------
# the two sides
# ------------------------------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """(wall, main-thread CPU) time after every training batch, and its loss: the isdpo side's step clock."""

    def __init__(self):
        self.marks, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, *a):
        sync()
        self.marks.append((time.perf_counter(), time.thread_time()))
        self.losses.append(float(outputs["loss"]))


def timed(marks: list[tuple[float, float]], bench: Bench) -> dict:
    """Throughput over the steps after the warm-up, by wall clock and by the main thread's CPU time.

    With one intra-op thread every op, the backward included (CPU autograd runs on the calling
    thread), and data loading (num_workers=0) run on the main thread, so its CPU time is the work
    of the step; unlike wall time it does not grow when other processes take the cores.
    """
    w, B = bench.spec.warmup, bench.spec.batch
    marks = marks[w - 1:] if w > 0 else marks
    steps = len(marks) - 1
    if steps < 1:  # a pre-warm run: nothing timed
        return {"steps_timed": 0}
    dt = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    wall = marks[-1][0] - marks[0][0]
    cpu = marks[-1][1] - marks[0][1]
    pairs = steps * B
    tokens = sum(bench.seq_tokens[w * B: (w + steps) * B])
    return {"steps_timed": steps, "seconds": wall, "cpu_seconds": cpu, "pairs_per_s": pairs / wall,
            "tokens_per_s": tokens / wall, "cpu_pairs_per_s": pairs / cpu, "cpu_tokens_per_s": tokens / cpu,
            "step_s_median": statistics.median(dt), "step_s": [round(x, 4) for x in dt]}


def run_isdpo(spec: RunSpec, bench: Bench, wrap=contextlib.nullcontext) -> dict:
    from torch.utils.data import DataLoader

    from isdpo.data.batching import LengthGroupedSampler, pair_length
    from isdpo.losses import build_loss
    from isdpo.recipe import pair_collator, pair_loader, preference_module, prepare_model
    from isdpo.ref_cache import add_reference_logps
    from isdpo.trainer import build_trainer

    B, S = bench.spec.batch, bench.spec
    examples = bench.examples
    out: dict = {}
    policy = bench.build_model()
    reference = freeze_copy(bench) if spec.ref == "online" or spec.ref == "precomputed" else None
    if spec.ref == "precomputed":
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            examples, _, _ = add_reference_logps(list(examples), reference, pad_id=bench.pad_id, cache_dir=tmp,
                                                 batch_size=B, precision="bf16-mixed" if BF16 else None)
        out["precompute_s"] = time.perf_counter() - t
        del reference
        reference = None
        release_memory()
    prepare_model(policy, activation_checkpointing=spec.grad_ckpt, compile=spec.compile)
    if spec.grouped:
        # warm-up batches first (the same pairs as every other configuration), then the timed pairs in
        # length-grouped order (isdpo.data.batching.LengthGroupedSampler, as LengthGroupedLoader uses it)
        w = S.warmup * B
        sampler = LengthGroupedSampler([pair_length(e) for e in examples[w:]], B, seed=0)
        order = list(range(w)) + [w + i for i in sampler.indices()]
        loader = DataLoader(examples, batch_size=B, sampler=order, drop_last=True,
                            collate_fn=pair_collator(bench.pad_id, packing=spec.packing, share_prompt=spec.share_prompt))
    else:
        loader = pair_loader(examples, batch_size=B, seed=0, shuffle=False, pad_id=bench.pad_id, packing=spec.packing,
                             share_prompt=spec.share_prompt)
    module = preference_module(policy, reference, build_loss("dpo", BETA), lr=LR, schedule="constant",
                               response_only=spec.response_only, concatenated=spec.concatenated,
                               fused_adamw=spec.fused_adam)
    hw = {"accelerator": "gpu" if torch.cuda.is_available() else "cpu", "devices": 1, "num_nodes": 1,
          "precision": "bf16-mixed" if BF16 else "32-true", "strategy": "auto"}
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(hw, max_steps=S.warmup + S.steps, accumulate=1, run_dir=Path(tmp), logger=False,
                                callbacks=[timer], gradient_clip_val=CLIP, progress=False)
        with wrap():
            trainer.fit(module, loader)
    out.update(timed(timer.marks, bench))
    out["mean_loss"] = statistics.fmean(timer.losses)  # the quantity TRL reports as training_loss
    del trainer, module, policy, reference, loader
    return out


def freeze_copy(bench: Bench):
    from isdpo.models import freeze

    return freeze(bench.build_model())


def run_trl(spec: RunSpec, bench: Bench, wrap=contextlib.nullcontext) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.marks.append((time.perf_counter(), time.thread_time()))

    class FixedOrderDPOTrainer(DPOTrainer):
        # the same batches as isdpo: the data set is already in a (seeded) random order
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    S = bench.spec
    out: dict = {}
    policy = bench.build_model()
    ref = freeze_copy(bench) if spec.ref == "online" else None
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=S.batch, max_steps=S.warmup + S.steps, learning_rate=LR,
            beta=BETA, loss_type=["sigmoid"], max_grad_norm=CLIP, optim=spec.trl_optim,
            gradient_checkpointing=spec.grad_ckpt, bf16=spec.trl_bf16 or BF16, use_cpu=not torch.cuda.is_available(),
            precompute_ref_log_probs=spec.ref == "precomputed", precompute_ref_batch_size=S.batch,
            report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
            lr_scheduler_type="constant",
        )
        timer = Timer()
        data = Dataset.from_list(bench.texts)
        t = time.perf_counter()
        trainer = FixedOrderDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                                       processing_class=bench.tok, callbacks=[timer])
        if spec.ref == "precomputed":
            out["precompute_s"] = time.perf_counter() - t  # tokenisation included (TRL does both in __init__)
        ds = trainer.train_dataset
        out["tokens_match_isdpo"] = (ds["prompt_ids"] == [e["prompt_ids"] for e in bench.examples]
                                     and ds["chosen_ids"] == [e["chosen_ids"] for e in bench.examples]
                                     and ds["rejected_ids"] == [e["rejected_ids"] for e in bench.examples])
        with wrap():
            res = trainer.train()
        out.update(timed(timer.marks, bench))
        out["mean_loss"] = float(res.training_loss)  # mean of the per-step losses
        del trainer, policy, ref, data, ds
    return out


def replace_spec(bench: Bench, spec: ModelSpec) -> Bench:
    b = copy.copy(bench)
    b.spec = spec
    return b


def run_one(spec: RunSpec, bench: Bench) -> dict:
    release_memory()
    time.sleep(0.2)
    with RSSMonitor() as mon:
        res = (run_isdpo if spec.side == "isdpo" else run_trl)(spec, bench)
        release_memory()
    if res.get("tokens_match_isdpo") is False:
        print(f"[bench] WARNING {spec.name}: TRL's token ids differ from isdpo's: the comparison is not like for like")
    res["peak_mem_mb"] = mon.peak_mb
    res["threads"] = torch.get_num_threads()
    if "tokens_per_s" in res:
        res["mfu"] = bench.mfu(res["tokens_per_s"], online_ref=spec.ref == "online",
                               shared_prompt=spec.packing and spec.share_prompt)
    return res


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rs in runs.items():
        out[name] = {k: median([r.get(k) for r in rs]) for k in (
            "pairs_per_s", "tokens_per_s", "cpu_pairs_per_s", "cpu_tokens_per_s", "step_s_median", "peak_mem_mb",
            "precompute_s", "mean_loss", "mfu")}
        out[name]["pairs_per_s_each_rep"] = [round(r["pairs_per_s"], 3) for r in rs]
        out[name]["cpu_pairs_per_s_each_rep"] = [round(r["cpu_pairs_per_s"], 3) for r in rs]
        out[name]["peak_mem_mb_each_rep"] = [round(r["peak_mem_mb"], 1) for r in rs]
    return out


RATIOS = [
    ("isdpo/online", "trl/online", "equal settings, online ref (target >= 1.2x, memory <= 1x)"),
    ("isdpo/precomputed", "trl/precomputed", "equal settings, precomputed ref"),
    ("isdpo/fast", "trl/online", "isdpo whole fast path vs TRL defaults (target >= 1.5x)"),
    ("isdpo/fast", "trl/precomputed", "isdpo whole fast path vs TRL precomputed"),
    ("isdpo/fast-online", "trl/online", "isdpo fast path, online ref, vs TRL defaults"),
    ("isdpo/online-plainadam", "trl/online-plainadam", "equal settings, both plain AdamW"),
    ("isdpo/online+gradckpt", "trl/online+gradckpt", "equal settings, both gradient checkpointing"),
]


def ratios(summary: dict, runs: dict) -> list[dict]:
    out = []
    for a, b, what in RATIOS:
        if a not in summary or b not in summary:
            continue
        row = {"isdpo": a, "trl": b, "what": what}
        for key in ("pairs_per_s", "cpu_pairs_per_s"):
            row[f"{key}_ratio"] = summary[a][key] / summary[b][key]
            row[f"{key}_ratio_paired_median"] = statistics.median(
                [ra[key] / rb[key] for ra, rb in zip(runs[a], runs[b])])
        row["tokens_per_s_ratio"] = summary[a]["tokens_per_s"] / summary[b]["tokens_per_s"]
        row["peak_mem_ratio"] = (summary[a]["peak_mem_mb"] / summary[b]["peak_mem_mb"]
                                 if summary[b]["peak_mem_mb"] else None)
        out.append(row)
    return out


def print_table(model: str, bench: Bench, summary: dict, rat: list[dict], threads: int):
    reps = len(next(iter(summary.values()))["pairs_per_s_each_rep"])
    print(f"\n=== {model}: {bench.describe()}\n    batch={bench.spec.batch} pairs, {bench.spec.steps} timed steps "
          f"(+{bench.spec.warmup} warm-up) per run, {reps} interleaved repeats, {threads} thread(s); "
          f"medians over repeats; 'cpu' = per main-thread CPU second")
    hdr = (f"{'config':28s} {'pairs/s':>8s} {'tokens/s':>9s} {'cpu pairs/s':>11s} {'cpu tok/s':>9s} "
           f"{'step s':>7s} {'peak MB':>8s} {'precomp s':>9s} {'mean loss':>9s} {'MFU':>6s}  cpu pairs/s each rep")
    print(hdr)
    print("-" * len(hdr))
    for name, s in summary.items():
        pre = f"{s['precompute_s']:9.2f}" if s["precompute_s"] is not None else f"{'-':>9s}"
        print(f"{name:28s} {s['pairs_per_s']:8.3f} {s['tokens_per_s']:9.0f} {s['cpu_pairs_per_s']:11.3f} "
              f"{s['cpu_tokens_per_s']:9.0f} {s['step_s_median']:7.3f} {s['peak_mem_mb']:8.1f} {pre} "
              f"{s['mean_loss']:9.6f} " + (f"{s['mfu']:6.1%}" if s.get("mfu") is not None else f"{'-':>6s}") + "  "
              f"{s['cpu_pairs_per_s_each_rep']}")
    print("ratios isdpo / TRL (of medians; 'paired' = median of the per-repeat ratios):")
    for r in rat:
        mem = f"{r['peak_mem_ratio']:.2f}x" if r["peak_mem_ratio"] is not None else "-"
        print(f"  {r['isdpo']:22s} / {r['trl']:20s} pairs/s wall {r['pairs_per_s_ratio']:.2f}x "
              f"(paired {r['pairs_per_s_ratio_paired_median']:.2f}x), cpu {r['cpu_pairs_per_s_ratio']:.2f}x "
              f"(paired {r['cpu_pairs_per_s_ratio_paired_median']:.2f}x); peak mem {mem}  [{r['what']}]")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2", *ARCHS, "all"], default="all",
                    help="all = tiny and smollm2 (CPU); smollm2-arch and llama-1b are random-init real architectures")
    ap.add_argument("--layers", type=int, help="override the decoder layers of smollm2-arch/llama-1b (CPU dry runs)")
    ap.add_argument("--vocab", type=int, help="override the vocabulary of smollm2-arch/llama-1b (CPU dry runs)")
    ap.add_argument("--steps", type=int, help="timed steps per run (default per model)")
    ap.add_argument("--warmup", type=int, help="untimed first steps per run (default per model)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats of every configuration")
    ap.add_argument("--batch", type=int, help="pairs per step (default per model)")
    ap.add_argument("--scale", type=float, help="length scale of TL;DR-like prompts/responses (default: tiny 0.5, smollm2 0.2)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every run")
    ap.add_argument("--ablations", action="store_true", help="also each fast-path switch alone")
    ap.add_argument("--extras", action="store_true", help="also TRL exactly as shipped (bf16 autocast, grad ckpt)")
    ap.add_argument("--compile", action="store_true", help="also isdpo with torch.compile (compiling takes minutes on CPU)")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (GPU runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-prewarm", action="store_true", help="skip the untimed first run of each side")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/bench_dpo_<model>.json)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    global BF16
    BF16 = args.bf16
    RESULTS.mkdir(parents=True, exist_ok=True)
    models = ["tiny", "smollm2"] if args.model == "all" else [args.model]
    specs = (MAIN + (ABLATIONS if args.ablations else []) + (EXTRAS if args.extras else [])
             + (COMPILE if args.compile else []))
    if args.only:
        specs = [s for s in specs if s.name in args.only]
    import transformers
    import trl

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "bf16": args.bf16,
               "load_avg_start": os.getloadavg()}
    print(f"[bench] {machine}", flush=True)
    all_results = {}
    for model in models:
        spec = MODELS[model]
        spec = replace(spec, **{k: v for k, v in {"steps": args.steps, "warmup": args.warmup,
                                                  "repeats": args.repeats, "batch": args.batch}.items()
                                if v is not None})
        if model == "smollm2" and not ensure_smollm2():
            print(f"[bench] smollm2 skipped: {GGUF_DIR / GGUF_FILE} is absent (run scripts/get_smollm2.sh)")
            continue
        scale = args.scale if args.scale is not None else spec.scale
        overrides = {k: v for k, v in {"num_hidden_layers": args.layers, "vocab_size": args.vocab}.items() if v}
        bench = Bench(model, spec, scale, args.seed, overrides)
        print(f"[bench] {model}: {bench.describe()}", flush=True)
        runs: dict[str, list[dict]] = {s.name: [] for s in specs}
        t0 = time.time()
        if not args.no_prewarm:  # lazy initialisation and first allocations of each side, not recorded
            short = replace(bench.spec, steps=0, warmup=1)
            for side in sorted({s.side for s in specs}):
                try:
                    run_one(RunSpec(f"{side}/prewarm", side), replace_spec(bench, short))
                except Exception as e:
                    print(f"[bench] prewarm {side} failed: {type(e).__name__}: {e}")
        for rep in range(spec.repeats):
            order = specs if rep % 2 == 0 else specs[::-1]
            for s in order:
                try:
                    r = run_one(s, bench)
                except Exception as e:  # a failing configuration is reported, the others still run
                    print(f"[bench] {model} {s.name} rep {rep}: FAILED {type(e).__name__}: {e}", flush=True)
                    runs[s.name].append(None)
                    continue
                runs[s.name].append(r)
                print(f"[bench] {model} rep {rep} {s.name:28s} {r['pairs_per_s']:8.3f} pairs/s "
                      f"(cpu {r['cpu_pairs_per_s']:8.3f}) {r['tokens_per_s']:9.0f} tok/s  peak {r['peak_mem_mb']:8.1f} MB  "
                      f"mean loss {r['mean_loss']:.6f}" + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "")
                      + (f"  precompute {r['precompute_s']:.2f}s"
                                                        if "precompute_s" in r else ""), flush=True)
        runs = {k: [r for r in v if r is not None] for k, v in runs.items()}
        runs = {k: v for k, v in runs.items() if v}
        summary = summarise(runs)
        rat = ratios(summary, runs)
        print_table(model, bench, summary, rat, args.threads)
        res = {"model": model, "machine": {**machine, "load_avg_end": os.getloadavg()}, "spec": asdict(spec),
               "scale": scale, "data": bench.describe(), "n_matmul_params": bench.n_matmul, "peak_flops": bench.peak,
               "arch": ARCHS.get(model) and {**ARCHS[model], **overrides}, "configs": {s.name: asdict(s) for s in specs},
               "summary": summary, "ratios": rat, "runs": runs, "wall_s": time.time() - t0}
        path = Path(args.out) if args.out and len(models) == 1 else RESULTS / f"bench_dpo_{model}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"[bench] wrote {path}")
        all_results[model] = res
    return all_results


if __name__ == "__main__":
    main()
