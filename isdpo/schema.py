"""The config schema: one dataclass per config group (and per block inside one), the only home of the keys,
their types, the fixed option sets and the ranges.

Every file in ``conf/<group>/`` extends its schema through its defaults list (``- /schema/<name>@_here_``,
names in :data:`SCHEMAS`), so composing rejects an unknown key in a YAML file, an override of a key that does
not exist and a value of the wrong type. :func:`check` then rejects what types cannot: a key added with ``+``,
a value left unset, a value outside its field's allowed set or range, and the rules that tie fields together.
Names that have an implementation registry (losses, dtypes, stages, tasks) are checked against it by
:func:`isdpo.config.validate`.

Plain dataclasses and OmegaConf: launch.py (and the tests) register them in Hydra's ConfigStore with
:func:`store`. The YAML files hold the values and their comments; a default here is a value every config of
that schema shares (the importance-sampling block).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

# Fixed option sets (names with an implementation registry are not here: stages in isdpo.stages.STAGES,
# tasks in isdpo.tasks.TASKS, losses in isdpo.losses.LOSSES; isdpo.config.validate checks those).
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
JUDGES = ("none", "openai", "hf")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
SCHEDULES = ("cosine", "constant")
RELABEL_SOURCES = ("dataset", "generate")
RELABEL_PAIRINGS = ("best_worst", "all")
RELABEL_FORMATS = ("jsonl", "parquet")
PREFERENCES = ("relabelled", "dataset")
REFERENCES = ("chosen", "rejected")
PAIR_FORMATS = ("auto", "standard", "conversational")  # task=preference: TRL's formats (isdpo/data/trl_formats.py)
PEFT_BACKENDS = ("none", "lora")
PEFT_STAGES = ("sft", "align")  # the stages that train cfg.model (the golden RM's adapters: task.reward.lora)
SEED_LIMIT = 2**32  # numpy's and torch's seeds are unsigned 32-bit


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}`` (lists and empty mappings are leaves): W&B's config, the
    resume identity check and the sweep report all compare configs key by key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class Rule:
    """A range: ``text`` completes "<key> must be ..." in the message; ``test`` gets a non-null value."""

    text: str
    test: Callable[[Any], bool]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE = Rule("> 0", lambda v: v > 0)
AT_LEAST_ONE = Rule(">= 1", lambda v: v >= 1)
NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)
PROBABILITY = Rule("in (0, 1]", lambda v: 0 < v <= 1)
FRACTION = Rule("in [0, 1)", lambda v: 0 <= v < 1)
SEED = Rule("an integer in [0, 2**32)", lambda v: 0 <= v < SEED_LIMIT)


def ranged(rule: Rule, default: Any = MISSING) -> Any:
    """A field whose value (when not null) must satisfy ``rule``."""
    return field(default=default, metadata={"rule": rule})


def one_of(allowed: tuple[str, ...], default: Any = MISSING) -> Any:
    """A field whose value must be one of ``allowed``."""
    return field(default=default, metadata={"allowed": allowed})


def variant(*schemas: type) -> Any:
    """A group with several schemas (tasks, loggers, judges): the node must extend one of them."""
    return field(default=MISSING, metadata={"schemas": schemas})


# --------------------------------------------------------------------------------------------
# model, loss, hardware, logger, judge
# --------------------------------------------------------------------------------------------


@dataclass
class Model:
    name: str = MISSING
    pretrained: Optional[str] = MISSING
    gguf_file: Optional[str] = MISSING
    tokenizer: Optional[str] = MISSING
    dtype: str = MISSING  # a key of isdpo.models.DTYPES
    attn_implementation: Optional[str] = MISSING
    config: Optional[Dict[str, Any]] = MISSING


@dataclass
class ImportanceSampling:
    """IS-DAA weighting (Nguyen et al. 2025, arXiv 2506.08681; docs/method.md), the same defaults for every
    loss: off, with the paper's settings ready for the IS variants (conf/loss/is*.yaml) that switch it on.
    The one home of these defaults (isdpo.losses takes its own from here); values and their allowed ranges
    are checked by isdpo.losses.build_loss."""

    enabled: bool = False  # true = weight each pair by stopgrad(w_clip) (IS-DAA)
    log_clip: Optional[float] = 2.0  # upper cap on log w (paper code: 2*eps, eps=1.0 in all released runs); null = no clip
    weight: str = "sequence"  # sequence = paper's pair ratio; token_mean = length-normalised (NOT the paper's)
    lower_log_clip: Optional[float] = None  # two-sided clip (NOT the paper's); null = none
    self_normalize: bool = False  # sum(w f)/sum(w) over the batch (NOT the paper's)


@dataclass
class Loss:
    name: str = MISSING
    base: str = MISSING  # a key of isdpo.losses.LOSSES (checked by building the loss)
    params: Dict[str, Any] = field(default_factory=dict)
    importance_sampling: ImportanceSampling = field(default_factory=ImportanceSampling)
    online: bool = False  # true = online training: each step samples and labels its pairs from the policy (isdpo/online.py)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        require(not (node.online and node.importance_sampling.enabled),
                f"{at}.online=true with {at}.importance_sampling.enabled=true: on-policy samples have importance "
                f"weight 1, so the two do not combine. Set {at}.importance_sampling.enabled=false (loss=online_dpo) "
                f"for online training, or {at}.online=false for IS-DAA on the offline pairs")


@dataclass
class Hardware:
    name: str = MISSING
    accelerator: str = one_of(ACCELERATORS)
    devices: int = ranged(AT_LEAST_ONE)
    num_nodes: int = ranged(AT_LEAST_ONE)
    precision: str = MISSING
    strategy: str = MISSING
    per_device_batch_size: int = ranged(AT_LEAST_ONE)
    sft_per_device_batch_size: Optional[int] = ranged(AT_LEAST_ONE)
    num_workers: int = ranged(NON_NEGATIVE)
    torch_threads: Optional[int] = ranged(AT_LEAST_ONE)
    activation_checkpointing: bool = MISSING
    peak_flops: Any = ranged(Rule("auto, null or a number > 0", lambda v: v == "auto" or (_number(v) and v > 0)))
    reuse_freed_memory: bool = False  # glibc malloc keeps freed memory for the next step (isdpo/host.py)


@dataclass
class Logger:
    name: str = one_of(LOGGERS)
    log_every_n_steps: int = ranged(AT_LEAST_ONE, 10)  # optimizer steps between two rows of training metrics


@dataclass
class WandbLogger(Logger):
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: str = one_of(WANDB_MODES)


@dataclass
class JudgeConfig:
    backend: str = one_of(JUDGES)


@dataclass
class OpenAIJudgeConfig(JudgeConfig):
    base_url: str = MISSING
    model: str = MISSING
    api_key_env: Optional[str] = MISSING
    n_prompts: int = ranged(AT_LEAST_ONE)
    seed: int = ranged(SEED)
    max_concurrency: int = ranged(AT_LEAST_ONE)
    max_retries: int = ranged(NON_NEGATIVE)
    timeout_s: float = ranged(POSITIVE)
    cache_path: str = MISSING
    price_per_1k_input: float = ranged(NON_NEGATIVE)
    price_per_1k_output: float = ranged(NON_NEGATIVE)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        # The client is an optional extra: stop here rather than after training, at the judge stage.
        require(importlib.util.find_spec("openai") is not None,
                f"{at}.backend=openai needs the openai package: pip install isdpo[judge] (or pip install openai), "
                f"or choose judge=hf (a local model) or judge=none")


@dataclass
class HFJudgeConfig(JudgeConfig):
    model: Model = field(default_factory=Model)
    n_prompts: int = ranged(AT_LEAST_ONE)
    seed: int = ranged(SEED)
    batch_size: int = ranged(AT_LEAST_ONE)


def _check_lora(node: DictConfig, at: str, what: str) -> None:
    t = node.target_modules
    require(t == "all-linear" or (OmegaConf.is_list(t) and len(t) > 0 and all(isinstance(x, str) for x in t)),
            f"{at}.target_modules must be all-linear or a non-empty list of module names, e.g. [q_proj, v_proj] "
            f"(got {t!r})")
    # An optional extra: stop here rather than after the SFT and the reference pass.
    require(importlib.util.find_spec("peft") is not None,
            f"{what} needs the peft package: pip install isdpo[lora] (or pip install peft), or train without "
            f"adapters")


@dataclass
class Lora:
    """LoRA adapters (PEFT's LoraConfig: r, lora_alpha, lora_dropout, target_modules)."""

    r: int = ranged(AT_LEAST_ONE)
    alpha: float = ranged(POSITIVE)
    dropout: float = ranged(Rule("in [0, 1)", lambda v: 0 <= v < 1))
    target_modules: Any = MISSING  # all-linear, or a list of module names


@dataclass
class RewardLora(Lora):
    enabled: bool = MISSING  # false: the RM trains in full

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        if node.enabled:
            _check_lora(node, at, f"{at}.enabled=true")


@dataclass
class Peft:
    backend: str = one_of(PEFT_BACKENDS)


@dataclass
class LoraPeft(Peft, Lora):
    merge_on_save: bool = MISSING
    stages: List[str] = MISSING

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        bad = [str(s) for s in node.stages if s not in PEFT_STAGES]
        require(not bad, f"{at}.stages: {', '.join(bad)} is not known; allowed: {', '.join(PEFT_STAGES)} (the "
                         f"golden RM's adapters are task.reward.lora)")
        _check_lora(node, at, f"{at}.backend=lora")


# --------------------------------------------------------------------------------------------
# tasks: the blocks every task has (sft, train, eval), the synthetic task, the text tasks
# --------------------------------------------------------------------------------------------


@dataclass
class Sft:
    epochs: int = ranged(AT_LEAST_ONE)
    batch_size: int = ranged(AT_LEAST_ONE)
    lr: float = ranged(POSITIVE)
    weight_decay: float = ranged(NON_NEGATIVE)
    warmup_steps: int = ranged(NON_NEGATIVE)
    schedule: str = one_of(SCHEDULES)
    seed: int = ranged(SEED)


@dataclass
class Train:
    global_batch_size: int = ranged(AT_LEAST_ONE)
    # the pairs left over after an epoch's last whole global batch: false = refuse a run that reaches them, true = skip
    drop_remainder: bool = False
    max_steps: int = ranged(AT_LEAST_ONE)
    lr: float = ranged(POSITIVE)
    weight_decay: float = ranged(NON_NEGATIVE)
    warmup_steps: int = ranged(NON_NEGATIVE)
    schedule: str = one_of(SCHEDULES)
    gradient_clip_val: float = ranged(NON_NEGATIVE)
    checkpoint_every_n_steps: int = ranged(NON_NEGATIVE)
    keep_checkpoints: bool = True  # false: checkpoints/ go once result.json is written (policy/, the curve stay)
    resume: bool = MISSING
    response_only_logits: bool = MISSING
    length_grouped: bool = MISSING
    group_batches: int = ranged(AT_LEAST_ONE)
    packing: bool = MISSING
    share_prompt: bool = MISSING
    concatenated_forward: bool = MISSING
    compile: bool = MISSING
    fused_adamw: bool = MISSING
    precompute_ref_logps: bool = MISSING
    ref_logps_batch_size: int = ranged(AT_LEAST_ONE)


@dataclass
class Eval:
    every_n_steps: int = ranged(NON_NEGATIVE)
    n_prompts: int = ranged(AT_LEAST_ONE)
    samples_per_prompt: int = ranged(AT_LEAST_ONE)
    temperature: float = ranged(POSITIVE)
    top_p: float = ranged(PROBABILITY)
    max_new_tokens: int = ranged(AT_LEAST_ONE)
    kl_exact_sampling: bool = MISSING
    batch_size: int = ranged(AT_LEAST_ONE)
    seed: int = ranged(SEED)
    n_pairs: int = ranged(NON_NEGATIVE)  # held-out pairs of the pair metrics (eval/loss, eval/rewards/*); 0 = none
    score_batch_size: Optional[int] = None  # sequences per log-prob forward; None: batch_size (same numbers either way)


# Task schemas by conf/task name: each is ``/schema/task/<name>`` (what a task's YAML extends) and a variant of
# Config.task.
TASK_SCHEMAS: dict[str, type] = {}


def task_schema(name: str) -> Callable[[type], type]:
    """Class decorator: registers a task's schema as ``/schema/task/<name>``."""

    def add(cls: type) -> type:
        if name in TASK_SCHEMAS:
            raise ValueError(f"task schema {name!r} is registered twice")
        TASK_SCHEMAS[name] = cls
        return cls

    return add


@dataclass
class TaskConfig:
    """What every task schema has. The class flags (not config keys) are what Config.check's rules ask of a task."""

    has_golden_reward: ClassVar[bool] = True  # a golden reward can label the policy's samples (loss.online)
    judgeable: ClassVar[bool] = False  # its evaluation writes text completions beside references (stage=judge)
    needs_tokenizer: ClassVar[bool] = False  # text: model.pretrained or model.tokenizer must be set

    name: str = MISSING


@task_schema("synthetic")
@dataclass
class SyntheticTaskConfig(TaskConfig):
    chain_seed: int = ranged(SEED)
    data_seed: int = ranged(SEED)
    n_states: int = ranged(AT_LEAST_ONE)
    n_successors: int = ranged(AT_LEAST_ONE)
    dirichlet_alpha: float = ranged(POSITIVE)
    prompt_length: int = ranged(AT_LEAST_ONE)
    response_length: int = ranged(AT_LEAST_ONE)
    good_tokens: List[int] = MISSING
    unsupported_penalty: float = MISSING
    n_sft_sequences: int = ranged(AT_LEAST_ONE)
    n_pref_prompts: int = ranged(AT_LEAST_ONE)
    pref_temperature: float = ranged(POSITIVE)
    heldout_prompt_fraction: float = ranged(FRACTION)
    sft: Sft = field(default_factory=Sft)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)


@dataclass
class PairColumns:
    prompt: str = MISSING
    chosen: str = MISSING
    rejected: str = MISSING


@dataclass
class SftColumns:
    prompt: str = MISSING
    response: str = MISSING


@dataclass
class Splits:
    train: str = MISSING
    eval: str = MISSING


@dataclass
class SftSource:
    dataset: Optional[str] = MISSING
    data_files: Any = MISSING  # a path, or {split: path}
    split: str = MISSING
    columns: SftColumns = field(default_factory=SftColumns)
    strip_suffix: Optional[str] = MISSING


@dataclass
class RewardSource:
    dataset: Optional[str] = MISSING
    data_files: Any = MISSING  # a path, or {split: path}
    train_split: str = MISSING
    val_split: str = MISSING
    columns: PairColumns = field(default_factory=PairColumns)
    strip_suffix: Optional[str] = MISSING
    drop_identical: bool = MISSING


@dataclass
class TextSft(Sft):
    sources: Dict[str, SftSource] = MISSING
    max_examples_per_source: Optional[int] = ranged(AT_LEAST_ONE)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        require(len(node.sources) > 0, f"{at}.sources is empty: the SFT stage needs at least one source")


@dataclass
class Reward:
    model: Model = field(default_factory=Model)
    path: Optional[str] = MISSING
    init_from_sft: bool = MISSING
    sources: Dict[str, RewardSource] = MISSING
    max_train_pairs: Optional[int] = ranged(AT_LEAST_ONE)
    max_val_pairs: Optional[int] = ranged(AT_LEAST_ONE)
    epochs: int = ranged(AT_LEAST_ONE)
    global_batch_size: int = ranged(AT_LEAST_ONE)
    lr: float = ranged(POSITIVE)
    weight_decay: float = ranged(NON_NEGATIVE)
    warmup_steps: int = ranged(NON_NEGATIVE)
    schedule: str = one_of(SCHEDULES)
    gradient_clip_val: float = ranged(NON_NEGATIVE)
    val_check_interval: Any = ranged(Rule("a number > 0", lambda v: _number(v) and v > 0))  # fraction or batches
    score_batch_size: int = ranged(AT_LEAST_ONE)
    score_dtype: Optional[str] = MISSING  # a key of isdpo.models.DTYPES; null = as saved
    seed: int = ranged(SEED)
    lora: RewardLora = field(default_factory=RewardLora)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        require(len(node.sources) > 0, f"{at}.sources is empty: the golden RM needs preference data")


@dataclass
class Relabel:
    path: Optional[str] = MISSING
    source: str = one_of(RELABEL_SOURCES)
    k: int = MISSING
    pairing: str = one_of(RELABEL_PAIRINGS)
    max_prompts: Optional[int] = ranged(AT_LEAST_ONE)
    temperature: float = MISSING
    top_p: float = MISSING
    max_new_tokens: int = ranged(AT_LEAST_ONE)
    batch_size: int = ranged(AT_LEAST_ONE)
    seed: int = ranged(SEED)
    format: str = one_of(RELABEL_FORMATS)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        if node.source != "generate":
            return  # k and the sampling settings are read only when generating
        require(node.k >= 2, f"{at}.k must be >= 2 to form pairs (got {node.k!r})")
        require(node.temperature > 0 and 0 < node.top_p <= 1, f"{at}.temperature must be > 0 and top_p in (0, 1]")


@dataclass
class TextTrain(Train):
    preferences: str = one_of(PREFERENCES)
    max_pairs: Optional[int] = ranged(AT_LEAST_ONE)
    epochs: int = ranged(AT_LEAST_ONE)


@dataclass
class TextEval(Eval):
    reference: str = one_of(REFERENCES)
    save_completions: bool = MISSING


@dataclass
class TokenizedTaskConfig(TaskConfig):
    """What the tasks on text data share (TL;DR and HH, your own pairs): the hub data set and the truncation
    policy (isdpo/data/tokenization.py)."""

    needs_tokenizer: ClassVar[bool] = True

    dataset: Optional[str] = MISSING
    drop_identical: bool = MISSING
    max_length: int = ranged(AT_LEAST_ONE)
    max_prompt_length: int = ranged(AT_LEAST_ONE)
    truncate_responses: bool = MISSING

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        require(node.max_prompt_length < node.max_length,
                f"{at}.max_prompt_length ({node.max_prompt_length}) must be a positive int < {at}.max_length "
                f"({node.max_length})")


@task_schema("text")
@dataclass
class TextTaskConfig(TokenizedTaskConfig):
    judgeable: ClassVar[bool] = True

    data_files: Any = MISSING  # a path, or {split: path}
    splits: Splits = field(default_factory=Splits)
    columns: PairColumns = field(default_factory=PairColumns)
    strip_suffix: Optional[str] = MISSING
    sft: TextSft = field(default_factory=TextSft)
    reward: Reward = field(default_factory=Reward)
    relabel: Relabel = field(default_factory=Relabel)
    train: TextTrain = field(default_factory=TextTrain)
    eval: TextEval = field(default_factory=TextEval)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        TokenizedTaskConfig.check(node, at)
        require(bool(node.dataset or node.data_files), f"{at}.dataset and {at}.data_files are both null")
        room = node.max_length - node.max_prompt_length
        require(node.relabel.source != "generate" or node.relabel.max_new_tokens <= room,
                f"{at}.relabel.max_new_tokens={node.relabel.max_new_tokens} exceeds {at}.max_length - "
                f"{at}.max_prompt_length = {room} (generated pairs would be truncated)")


@dataclass
class PreferenceColumns:
    prompt: Optional[str] = MISSING  # null or absent from the data: the implicit prompt
    chosen: str = MISSING
    rejected: str = MISSING
    chosen_logp: Optional[str] = MISSING  # behaviour log-probs (IS's mu); null or absent from the data: none
    rejected_logp: Optional[str] = MISSING


@dataclass
class PreferenceSplits:
    train: str = MISSING
    eval: Optional[str] = MISSING  # null: held-out pairs carved from train


@dataclass
class PreferenceFiles:
    train: Optional[str] = MISSING
    eval: Optional[str] = MISSING


@dataclass
class PreferenceSft(Sft):
    enabled: bool = MISSING  # false: the reference is model.pretrained itself (no SFT stage)


@dataclass
class PreferenceTrain(Train):
    max_steps: Optional[int] = ranged(AT_LEAST_ONE)  # null: task.train.epochs passes over the pairs
    max_pairs: Optional[int] = ranged(AT_LEAST_ONE)
    epochs: int = ranged(AT_LEAST_ONE)


@dataclass
class PreferenceEval:
    every_n_steps: int = ranged(NON_NEGATIVE)
    n_pairs: int = ranged(NON_NEGATIVE)
    holdout_fraction: float = ranged(Rule("in (0, 1)", lambda v: 0 < v < 1))
    seed: int = ranged(SEED)


@task_schema("preference")
@dataclass
class PreferenceTaskConfig(TokenizedTaskConfig):
    has_golden_reward: ClassVar[bool] = False

    data_files: PreferenceFiles = field(default_factory=PreferenceFiles)
    splits: PreferenceSplits = field(default_factory=PreferenceSplits)
    format: str = one_of(PAIR_FORMATS)
    columns: PreferenceColumns = field(default_factory=PreferenceColumns)
    chat_template: Optional[str] = MISSING
    sft: PreferenceSft = field(default_factory=PreferenceSft)
    train: PreferenceTrain = field(default_factory=PreferenceTrain)
    eval: PreferenceEval = field(default_factory=PreferenceEval)

    @staticmethod
    def check(node: DictConfig, at: str) -> None:
        TokenizedTaskConfig.check(node, at)
        require(bool(node.dataset or node.data_files.train),
                f"{at}.dataset and {at}.data_files.train are both null: name a hub data set or a local file "
                f"(JSONL, JSON, Parquet, CSV), e.g. {at}.data_files.train=my_pairs.jsonl")
        require(node.data_files.eval is None or bool(node.data_files.train),
                f"{at}.data_files.eval is set but {at}.data_files.train is null: give the training file too")


# --------------------------------------------------------------------------------------------
# the whole config
# --------------------------------------------------------------------------------------------


@dataclass
class Paths:
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class Config:
    task: Any = variant(*TASK_SCHEMAS.values())
    model: Model = field(default_factory=Model)
    loss: Loss = field(default_factory=Loss)
    hardware: Hardware = field(default_factory=Hardware)
    logger: Any = variant(Logger, WandbLogger)
    judge: Any = variant(JudgeConfig, OpenAIJudgeConfig, HFJudgeConfig)
    peft: Any = variant(Peft, LoraPeft)
    stage: str = MISSING  # checked by isdpo.config.validate (STAGES)
    experiment: str = MISSING
    beta: float = ranged(POSITIVE)
    seed: int = ranged(SEED)
    run_name: str = MISSING
    paths: Paths = field(default_factory=Paths)

    @staticmethod
    def check(cfg: DictConfig, at: str) -> None:
        task = OmegaConf.get_type(cfg.task)  # a TaskConfig: its flags say what the task offers
        backend = cfg.judge.backend
        require(backend == "none" or task.judgeable or cfg.stage not in ("judge", "pipeline"),
                "judge.backend needs a text task (task=tldr|hh): the synthetic task has no text to judge")
        require(cfg.stage != "judge" or backend != "none",
                "stage=judge needs judge=openai or judge=hf (judge.backend is none)")
        if task.needs_tokenizer:  # the text tasks have no vocabulary of their own
            require(bool(cfg.model.pretrained or cfg.model.tokenizer),
                    f"model={cfg.model.name!r} has no checkpoint (model.pretrained is null): task={cfg.task.name} needs "
                    f"a pretrained model, e.g. model=llama32_3b (the paper), pythia_1b, smollm2_135m or tiny_llama_local")
        require(cfg.peft.backend == "none" or cfg.hardware.strategy != "fsdp",
                f"peft.backend={cfg.peft.backend} with hardware.strategy=fsdp is not supported: the adapters are "
                f"small enough for data parallelism (a hardware profile with strategy ddp), or train without them "
                f"(peft=none)")
        require(not cfg.loss.online or task.has_golden_reward,
                f"loss.online=true needs a golden reward to label the policy's samples: task={cfg.task.name} has "
                f"none; use task=synthetic, tldr or hh, or loss.online=false")
        require(not cfg.loss.online or cfg.hardware.strategy != "fsdp",
                f"loss.online=true with hardware.strategy=fsdp is not supported: each rank samples its own prompts, "
                f"and sharded weights would make the ranks' forwards wait on each other; use a hardware profile "
                f"with strategy ddp (or auto)")
        require(not (cfg.task.train.packing and cfg.model.attn_implementation == "flash_attention_2"),
                "task.train.packing=true needs model.attn_implementation sdpa or eager (the packed block-diagonal "
                "mask cannot go through flash_attention_2)")


# Hydra's ConfigStore names (``/schema/<name>`` in a defaults list) -> schema.
SCHEMAS: dict[str, type] = {
    "config": Config, "model": Model, "loss": Loss, "hardware": Hardware,
    "logger/base": Logger, "logger/wandb": WandbLogger,
    "judge/none": JudgeConfig, "judge/openai": OpenAIJudgeConfig, "judge/hf": HFJudgeConfig,
    "peft/none": Peft, "peft/lora": LoraPeft,
    **{f"task/{name}": schema for name, schema in TASK_SCHEMAS.items()},
}


def default_of(path: str) -> tuple[bool, Any]:
    """(True, default) when the schema gives the dotted config key ``path`` a default (``loss.online`` -> False),
    else (False, None): what a config written before the key existed meant. In a group with several schemas
    (task, logger, judge, peft) the schemas that declare the key must agree on it."""
    schemas, parts = [Config], path.split(".")
    for i, part in enumerate(parts):
        fields = [f for s in schemas for f in dataclasses.fields(s) if f.name == part]
        if not fields:
            return False, None
        if i == len(parts) - 1:  # a leaf: a plain default (blocks and dicts have a factory; MISSING is none)
            values = [f.default for f in fields]
            if any(v is MISSING or v is dataclasses.MISSING for v in values) or len({repr(v) for v in values}) > 1:
                return False, None
            return True, values[0]
        schemas = [s for f in fields for s in f.metadata.get("schemas", ())]
        schemas += [f.default_factory for f in fields if dataclasses.is_dataclass(f.default_factory)]
    return False, None


def store(config_store: Any) -> None:
    """Register :data:`SCHEMAS` as ``schema/<name>`` in Hydra's ConfigStore (passed in: no Hydra import here)."""
    for name, node in SCHEMAS.items():
        group, _, leaf = f"schema/{name}".rpartition("/")
        config_store.store(group=group, name=leaf, node=node)


# --------------------------------------------------------------------------------------------
# checking a composed config against the schema
# --------------------------------------------------------------------------------------------


def _schema_name(schema: type) -> str:
    return next(f"/schema/{name}@_here_" for name, s in SCHEMAS.items() if s is schema)


def check(cfg: DictConfig) -> None:
    """Raise ConfigError on the first value the schema rejects (keys added with ``+``, unset values, values
    outside their field's allowed set or range, cross-field rules); ``cfg`` is the composed config."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConfigError(f"{shown} {'is' if len(missing) == 1 else 'are'} not set (???): the file selected for each "
                          f"config group must set every key of its schema (isdpo/schema.py); a file named _*.yaml is "
                          f"a shared base to extend, not an option to select")
    _check_node(cfg, Config, "")


def _check_node(node: DictConfig, schema: type, at: str) -> None:
    """Unknown keys, then this node's values, then its blocks, then the rules that tie its fields together."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    _check_keys(node, fields, at)
    for name, f in fields.items():
        if not OmegaConf.is_interpolation(node, name):  # a reference is checked where it points
            _check_value(f"{at}.{name}".lstrip("."), node[name], f.metadata)
    for name, f in fields.items():
        if OmegaConf.is_interpolation(node, name) or not isinstance(node[name], DictConfig):
            continue
        key, child = f"{at}.{name}".lstrip("."), node[name]
        kind = OmegaConf.get_type(child)
        if "schemas" in f.metadata:
            require(kind in f.metadata["schemas"],
                    f"{key} does not extend a schema: the defaults list of its conf/{name}/ file must start with "
                    f"one of {', '.join(_schema_name(s) for s in f.metadata['schemas'])}")
        if dataclasses.is_dataclass(kind):
            _check_node(child, kind, key)
            continue
        for k in child:  # a dict of blocks (task.sft.sources) or of free keyword arguments (model.config)
            if isinstance(child[k], DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child[k])):
                _check_node(child[k], OmegaConf.get_type(child[k]), f"{key}.{k}")
    if hasattr(schema, "check"):
        schema.check(node, at)


def _check_value(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if "allowed" in meta:
        require(value in meta["allowed"], f"{key}={value!r} is not known; allowed: {', '.join(meta['allowed'])}")
    if "rule" in meta and value is not None:
        try:
            ok = meta["rule"].test(value)
        except TypeError:  # a string where a number belongs (an untyped field)
            ok = False
        require(ok, f"{key} must be {meta['rule'].text} (got {value!r})")


def _check_keys(node: DictConfig, fields: dict, at: str) -> None:
    """A ``+key=value`` override adds a key Hydra does not check (a typo): name it and the closest keys."""
    unknown = sorted(str(k) for k in node.keys() if k not in fields and not (at == "" and k == "hydra"))
    if not unknown:
        return
    name = unknown[0]
    key = f"{at}.{name}".lstrip(".")
    close = [f"{at}.{c}".lstrip(".") for c in difflib.get_close_matches(name, list(fields), n=3)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    where = f"keys under {at}" if at else "top-level keys"
    raise ConfigError(f"{key} is not a known key{hint} ({where}: {', '.join(fields)}). Fix the name: the keys "
                      f"each config may hold are declared in isdpo/schema.py")
