"""Every config in conf/ composes and validates; bad values stop the run with a message naming the key."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from isdpo.config import ConfigError, validate
from isdpo.schema import SCHEMAS, TASK_SCHEMAS
from tests.hydra_utils import CONF, ROOT, SMALL, compose_cfg

# sweep/ (a link to sweeps/) is appended with +sweep=NAME and checked in tests/test_sweeps.py
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "sweep"))


def group_options(group: str) -> list[str]:
    """The options of a group; a file named _*.yaml is a shared base, not an option."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def config_error(overrides: list[str], tmp_path: Path) -> str:
    """The message that stops a run with ``overrides``: Hydra's when composing fails (an unknown key, a value of
    the wrong type; launch.py prints both lines), otherwise validate's."""
    try:
        cfg = compose_cfg(overrides, tmp_path)
    except ConfigCompositionException as err:
        return f"{err}\n{err.__cause__}"
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return str(info.value)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in group_options(g)], ids=lambda v: str(v)
)
def test_every_config_composes_and_validates(group, option, tmp_path):
    # text tasks need a pretrained model with a tokenizer (the tiny default has none): pair them with the paper's
    extra = ["model=llama32_3b"] if group == "task" and option in ("tldr", "hh", "preference") else []
    if group == "judge" and option != "none":  # judges read text: a text task
        extra = ["task=hh", "model=llama32_3b"]
    cfg = compose_cfg([f"{group}={option}", *extra], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    node = cfg[group]
    assert OmegaConf.get_type(node) in SCHEMAS.values(), "the file extends one of its group's schemas"
    assert (node.name if "name" in node else node.backend) == option  # the file is the option it is named after
    local = cfg.model.pretrained and str(cfg.model.pretrained).startswith(("/", ".", "~"))
    if group == "model" and local and not (ROOT / str(cfg.model.pretrained)).exists():
        pytest.skip(f"model={option} points to a local file that a fresh checkout does not have")
    validate(cfg)


def test_every_config_key_is_documented():
    """Config is data: every key in conf/ carries a one-line comment (on its line or the line above)."""
    missing = []
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
                continue
            documented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
            parent_doc = line.startswith(" ") and any(
                "#" in lines[j] for j in range(i - 1, -1, -1) if not lines[j].startswith(" " * (len(line) - len(line.lstrip())))
            )
            if not (documented or parent_doc):
                missing.append(f"{path.relative_to(ROOT)}:{i + 1}: {stripped}")
    assert not missing, "undocumented config keys:\n" + "\n".join(missing)


TEXT = ["task=hh", "model=llama32_3b"]
BAD = [
    (["loss.base=nope"], r"loss.base='nope' is not a known loss; available: .*dpo"),
    (["beta=-0.1"], r"beta must be > 0"),
    (["beta=0"], r"beta must be > 0"),
    (["beta=abc"], r"Value 'abc' of type 'str' could not be converted to Float\n\s+full_key: beta"),
    (["loss.importance_sampling.log_clip=-1"], r"loss.importance_sampling.log_clip must be >= 0"),
    (["stage=nope"], r"stage='nope' is not known; allowed: sft, reward, relabel, align, evaluate, judge, pipeline"),
    (["task.eval.top_p=1.5"], r"task.eval.top_p must be in \(0, 1\]"),
    (["task.train.global_batch_size=50"], r"global_batch_size=50 is not a multiple of hardware.per_device_batch_size"),
    (["task.train.lr=fast"], r"could not be converted to Float\n\s+full_key: task.train.lr"),
    (["task.train.lrr=1"], r"Could not override 'task.train.lrr'.*\n.*\nKey 'lrr' not in 'Train'"),
    (["task.train.schedule=linear"], r"task.train.schedule='linear' is not known; allowed: cosine, constant"),
    (["model.pretrained=/nonexistent/model"], r"model.pretrained='/nonexistent/model': no such file"),
    (["model.dtype=fp8"], r"model.dtype='fp8' is not supported; allowed: float32, bfloat16, float16"),
    (["model.gradient_checkpointing=true"], r"Key 'gradient_checkpointing' not in 'Model'"),  # one switch: hardware
    (["logger.mode=sometimes"], r"logger.mode='sometimes' is not known; allowed: auto, online, offline"),
    (["hardware.accelerator=tpu"], r"hardware.accelerator='tpu' is not known; allowed: cpu, gpu, cuda, mps, auto"),
    (["hardware.devices=0"], r"hardware.devices must be >= 1 \(got 0\)"),
    (["hardware.peak_flops=fast"], r"hardware.peak_flops must be auto, null or a number > 0 \(got 'fast'\)"),
    (["seed=-1"], r"^seed must be an integer in \[0, 2\*\*32\) \(got -1\)"),
    (["seed=4294967296"], r"^seed must be an integer in \[0, 2\*\*32\) \(got 4294967296\)"),
    (["seed=1.5"], r"Value '1.5' of type 'float' could not be converted to Integer\n\s+full_key: seed"),
    (["seed=true"], r"Value 'True' of type 'bool' could not be converted to Integer\n\s+full_key: seed"),
    (["seed=abc"], r"Value 'abc' of type 'str' could not be converted to Integer\n\s+full_key: seed"),
    (["task.sft.seed=-3"], r"task.sft.seed must be an integer in \[0, 2\*\*32\)"),
    (["task.eval.seed=0.5"], r"could not be converted to Integer\n\s+full_key: task.eval.seed"),
    (["task.data_seed=-2"], r"task.data_seed must be an integer in \[0, 2\*\*32\)"),
    (["judge=openai"], r"judge.backend needs a text task"),
    (["stage=judge"], r"stage=judge needs judge=openai or judge=hf"),
    # the text tasks
    ([*TEXT, "task.max_prompt_length=640"], r"task.max_prompt_length \(640\) must be a positive int < task.max_length"),
    ([*TEXT, "task.relabel.source=sample"], r"task.relabel.source='sample' is not known; allowed: dataset, generate"),
    ([*TEXT, "task.relabel.pairing=random"], r"task.relabel.pairing='random' is not known; allowed: best_worst, all"),
    ([*TEXT, "task.relabel.format=csv"], r"task.relabel.format='csv' is not known; allowed: jsonl, parquet"),
    ([*TEXT, "task.relabel.source=generate", "task.relabel.k=1"], r"task.relabel.k must be >= 2 to form pairs"),
    ([*TEXT, "task.relabel.source=generate", "task.relabel.max_new_tokens=200"],
     r"task.relabel.max_new_tokens=200 exceeds task.max_length - task.max_prompt_length = 128"),
    ([*TEXT, "task.train.preferences=human"], r"task.train.preferences='human' is not known; allowed: relabelled, dataset"),
    ([*TEXT, "task.eval.reference=both"], r"task.eval.reference='both' is not known; allowed: chosen, rejected"),
    ([*TEXT, "task.reward.global_batch_size=0"], r"task.reward.global_batch_size must be >= 1 \(got 0\)"),
    ([*TEXT, "task.reward.score_dtype=int8"], r"task.reward.score_dtype='int8' is not supported"),
    ([*TEXT, "task.reward.model.dtype=int8"], r"task.reward.model.dtype='int8' is not supported"),
    ([*TEXT, "task.dataset=null"], r"task.dataset and task.data_files are both null"),
    ([*TEXT, "~task.sft.sources.tldr_sft", "~task.sft.sources.hh_chosen"], r"task.sft.sources is empty: the SFT stage needs at least one source"),
    ([*TEXT, "~task.columns.rejected"], r"PairColumns \(DictConfig\) does not support deletion\n\s+full_key: task.columns"),
    ([*TEXT, "task.sft.sources.hh_chosen.split=???"], r"task.sft.sources.hh_chosen.split is not set \(\?\?\?\)"),
    (["task=hh", "model=tiny"], r"model='tiny' has no checkpoint .* task=hh needs a pretrained model, e.g. model=llama32_3b"),
    ([*TEXT, "task.train.packing=true", "model.attn_implementation=flash_attention_2"],
     r"task.train.packing=true needs model.attn_implementation sdpa or eager"),
    # a shared base is not a task
    (["task=_text", "model=llama32_3b"], r"task.columns.chosen, .*task.name.* are not set \(\?\?\?\).*a file named "
                                         r"_\*.yaml is a shared base to extend, not an option to select"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_give_the_intended_message(overrides, message, tmp_path):
    assert re.search(message, config_error(overrides, tmp_path)), config_error(overrides, tmp_path)


def test_largest_seed_is_valid(tmp_path):
    cfg = compose_cfg(["seed=4294967295", "task.sft.seed=4294967295", "task.eval.seed=0"], tmp_path)
    validate(cfg)
    assert (cfg.seed, cfg.task.sft.seed, cfg.task.eval.seed) == (2**32 - 1, 2**32 - 1, 0)
    assert cfg.task.data_seed == 2**32 - 1  # the data seed follows the run's seed


UNKNOWN = [
    (["+task.train.lrr=1"], r"task.train.lrr is not a known key; did you mean task.train.lr\? \(keys under task.train: "
                            r".*global_batch_size.*\)"),
    (["+sed=1"], r"sed is not a known key; did you mean seed\? \(top-level keys: .*beta.*\)"),
    # a whole new sub-tree: the message names its root, not the leaf
    (["+task.trainn.lr=1"], r"task.trainn is not a known key; did you mean task.train\?"),
    (["beta=0.05", "+model.zzz_unrelated=1"], r"model.zzz_unrelated is not a known key \(keys under model: .*pretrained"),
    # `++` adds on purpose, but no code would read a key the schema does not declare
    (["++task.eval.seeed=1"], r"task.eval.seeed is not a known key; did you mean task.eval.seed\?"),
    (["task=hh", "model=llama32_3b", "+task.sft.sources.hh_chosen.splitt=a"],
     r"task.sft.sources.hh_chosen.splitt is not a known key; did you mean task.sft.sources.hh_chosen.split\?"),
]


@pytest.mark.parametrize("overrides,message", UNKNOWN, ids=[u[0][-1] for u in UNKNOWN])
def test_plus_override_of_an_unknown_key_names_the_closest_keys(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)  # Hydra itself accepts a `+key` it does not know
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize("overrides,key,value", [
    (["+sweep=synthetic_small"], "experiment", "synthetic_small"),  # `+` on a config group (a new defaults entry)
    (["+sweep=is_clip", "seed=1", "beta=0.05"], "experiment", "is_clip"),
    (["++task.train.lr=0.001"], "task.train.lr", 0.001),  # `++` forces: override or add, on purpose
    (["task.train.lr=0.001"], "task.train.lr", 0.001),
    (["+model.config.rope_theta=10000.0"], "model.config.rope_theta", 10000.0),  # model.config, loss.params: kwargs
    (["loss=rdpo", "++loss.params.alpha=0.02"], "loss.params.alpha", 0.02),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_plus_on_a_group_and_plain_overrides_still_validate(overrides, key, value, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    validate(cfg)
    assert OmegaConf.select(cfg, key) == value  # the override reached its key


def test_a_typo_in_a_config_file_fails_when_composing(tmp_path):
    """A file that extends a schema cannot carry a key it does not declare, nor a value of the wrong type."""
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "typo.yaml").write_text("defaults:\n  - dpo\n  - _self_\nnmae: typo\n")
    (tmp_path / "loss" / "badtype.yaml").write_text("defaults:\n  - dpo\n  - _self_\nimportance_sampling:\n"
                                                    "  enabled: maybe\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    assert re.search(r"Key 'nmae' not in 'Loss'", config_error([search, "loss=typo"], tmp_path))
    assert re.search(r"Value 'maybe' is not a valid bool.*\n.*full_key: (loss.)?importance_sampling.enabled",
                     config_error([search, "loss=badtype"], tmp_path))


def test_every_config_file_extends_a_schema_or_a_sibling():
    """The first defaults entry of every group file is its schema (/schema/<name>@_here_) or another file of
    its group that does (isdpo.yaml extends dpo.yaml, tldr.yaml extends _text.yaml)."""
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            first = yaml.safe_load(path.read_text())["defaults"][0]
            if isinstance(first, str) and first.startswith("/schema/"):
                assert first.removeprefix("/schema/").removesuffix("@_here_") in SCHEMAS, path
            else:
                assert isinstance(first, str) and (CONF / group / f"{first}.yaml").exists(), path


def test_is_variants_are_their_base_loss_with_importance_sampling_on():
    for variant, base in (("isdpo", "dpo"), ("isipo", "ipo"), ("isslic", "slic")):
        expected = OmegaConf.to_container(compose_cfg([f"loss={base}"]).loss)
        expected["name"] = variant
        expected["importance_sampling"]["enabled"] = True
        assert OmegaConf.to_container(compose_cfg([f"loss={variant}"]).loss) == expected
    # the block is the same in every loss: the schema's defaults
    blocks = {o: OmegaConf.to_container(compose_cfg([f"loss={o}"]).loss.importance_sampling)
              for o in group_options("loss")}
    assert {o for o, b in blocks.items() if b["enabled"]} == {"isdpo", "isipo", "isslic", "isdpo_noclip"}
    # the clip-free arm is IS-DPO with only the clip removed
    assert {**blocks["isdpo_noclip"], "log_clip": 2.0} == blocks["isdpo"]
    assert blocks["isdpo_noclip"]["log_clip"] is None
    assert all({**b, "enabled": False} == {"enabled": False, "log_clip": 2.0, "weight": "sequence",
                                           "lower_log_clip": None, "self_normalize": False}
               for o, b in blocks.items() if o != "isdpo_noclip")


def test_every_task_runtime_has_its_file_and_registered_schema():
    """A task is its runtime (isdpo.tasks.TASKS), its conf/task file and the schema that file extends, registered
    with schema.task_schema; Config.check reads what a task offers from that schema's flags."""
    from isdpo.tasks import TASKS

    schemas = {}
    for option in group_options("task"):
        cfg = compose_cfg([f"task={option}", "model=llama32_3b"])
        assert OmegaConf.get_type(cfg.task) in TASK_SCHEMAS.values(), option
        schemas[cfg.task.name] = OmegaConf.get_type(cfg.task)
    assert set(schemas) == set(TASKS)
    assert {n for n, s in schemas.items() if s.judgeable} == {"tldr", "hh"}
    assert {n for n, s in schemas.items() if not s.has_golden_reward} == {"preference"}
    assert {n for n, s in schemas.items() if not s.needs_tokenizer} == {"synthetic"}


def test_online_variants_are_their_base_loss_trained_online():
    """loss=online_dpo and loss=online_ipo are loss=dpo and loss=ipo with loss.online=true (docs/method.md)."""
    online = {o for o in group_options("loss") if compose_cfg([f"loss={o}"]).loss.online}
    assert online == {"online_dpo", "online_ipo"}
    for variant in online:
        base = variant.removeprefix("online_")
        expected = {**OmegaConf.to_container(compose_cfg([f"loss={base}"]).loss), "name": variant, "online": True}
        assert OmegaConf.to_container(compose_cfg([f"loss={variant}"]).loss) == expected


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_text_tasks_share_everything_but_their_data_set():
    tldr, hh = (_flat(OmegaConf.to_container(compose_cfg([f"task={t}", "model=llama32_3b"]).task)) for t in ("tldr", "hh"))
    assert set(tldr) == set(hh)
    assert {k for k in tldr if tldr[k] != hh[k]} == {"name", "dataset", "splits.eval", "columns.prompt", "strip_suffix",
                                                      "train.max_steps"}


def test_launch_rejects_an_unknown_plus_key_before_running(tmp_path):
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *SMALL, "stage=sft", "+task.train.lrr=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "task.train.lrr is not a known key; did you mean task.train.lr?" in out, out[-3000:]
    assert not (tmp_path / "cache" / "sft").exists()  # stopped before any stage ran


def test_unknown_loss_choice_is_rejected_by_hydra_with_the_options():
    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_cfg(["loss=nope"])


def test_global_batch_is_fixed_across_hardware(tmp_path):
    from isdpo.trainer import accumulation

    for hw in group_options("hardware"):
        cfg = compose_cfg([f"hardware={hw}"], tmp_path)
        h = cfg.hardware
        acc = accumulation(cfg.task.train.global_batch_size, h.per_device_batch_size, h.devices, h.num_nodes)
        assert acc * h.per_device_batch_size * h.devices * h.num_nodes == cfg.task.train.global_batch_size


def test_run_dir_is_deterministic_from_overrides():
    a = compose_cfg(["loss=dpo", "beta=0.01"], run=False)
    b = compose_cfg(["beta=0.01", "loss=dpo", "logger=none"], run=False)
    assert a.hydra.run.dir == "outputs/default/" + a.hydra.job.override_dirname
    assert a.hydra.job.override_dirname == b.hydra.job.override_dirname == "beta=0.01,loss=dpo"


def test_long_overrides_give_a_short_deterministic_folder_name():
    from isdpo.resolvers import MAX_DIRNAME, run_dirname

    long = ",".join(f"task.some.key{i}=value{i}" for i in range(30))
    name = run_dirname(long)
    assert len(name) <= MAX_DIRNAME and name == run_dirname(long) and name != run_dirname(long + "x")
    assert run_dirname("beta=0.01,loss=dpo") == "beta=0.01,loss=dpo"
    # pinned: resume finds the folders that runs before the escaping of unsafe characters created
    assert name == ("task.some.key0=value0,task.some.key1=value1,task.some.key2=value2,task.some.key3=value3,"
                    "task.some.key4=valu~809cd516d40b")
    for plain in ("+size=resume", "model.name='a b,c'", "beta=0.01,loss=isdpo,seed=0", ""):
        assert run_dirname(plain) == plain


def test_a_slash_in_an_override_value_does_not_nest_the_run_folder():
    from isdpo.resolvers import run_dirname

    cfg = compose_cfg(["model.pretrained=/tmp/x/y", "beta=0.01"], run=False)
    assert cfg.hydra.run.dir == "outputs/default/beta=0.01,model.pretrained=%2Ftmp%2Fx%2Fy"
    assert Path(cfg.hydra.run.dir).parent == Path("outputs/default")
    assert run_dirname("a=x\x00y\nz") == "a=x%00y%0Az"
    # escaped, not replaced: different values keep different folders
    names = [run_dirname(f"a={v}") for v in ("x/y", "x_y", "x%2Fy", "x%y", "x%25y")]
    assert len(set(names)) == len(names) and not any("/" in n for n in names)
    long = run_dirname("model.pretrained=" + "/d" * 100)
    assert "/" not in long and long != run_dirname("model.pretrained=" + "%2Fd" * 100)
