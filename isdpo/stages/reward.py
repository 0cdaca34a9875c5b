"""stage=reward: the golden reward model, trained with the Bradley-Terry loss on the reward block's
preference sources (or reused), published at ``task.reward.path`` or its cache entry."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
from torch.utils.data import DataLoader

from isdpo.artifacts import publish, reward_dir, reward_key
from isdpo.data.loader import plan_steps
from isdpo.data.records import load_pairs
from isdpo.data.rows import as_plain, require_nonempty, subsample
from isdpo.data.tokenization import get_tokenizer, tokenize_pairs
from isdpo.golden_rm import load_reward_model, score_head_names
from isdpo.models import merge_adapters
from isdpo.module import RewardModule
from isdpo.recipe import pair_collator, pair_loader, prepare_model
from isdpo.run_guard import check_steps, fit
from isdpo.stages.common import LORA_KEYS, run_dir, stage_logger
from isdpo.stages.sft import sft_reference
from isdpo.tasks import build_task
from isdpo.trainer import accumulation, build_trainer, finish_logger, full_state_dict


def reward_pairs(task_cfg: Mapping[str, Any], tokenizer, which: str) -> list[dict]:
    """Tokenized RM pairs of every ``reward.sources`` entry, ``which`` in {"train", "val"}, pooled."""
    r = task_cfg["reward"]
    out: list[dict] = []
    for name, spec in as_plain(r["sources"]).items():
        split = spec[f"{which}_split"]
        pairs, counts = load_pairs(spec, split)
        limit = r.get("max_train_pairs") if which == "train" else r.get("max_val_pairs")
        pairs = subsample(pairs, limit, int(r.get("seed", 0)))
        toks, _ = tokenize_pairs(pairs, tokenizer, max_length=task_cfg["max_length"],
                                 max_prompt_length=task_cfg["max_prompt_length"],
                                 truncate_responses=task_cfg["truncate_responses"],
                                 name=f"reward/{name}/{split}", pre_counts=counts)
        out.extend(toks)
    require_nonempty(out, f"the golden RM's {which} set")
    return out


def run_reward(cfg, fast_dev_run: bool = False) -> Path:
    """Train the golden RM (or reuse it); returns its directory (``model/`` + ``meta.json``)."""
    task, hw = cfg.task, cfg.hardware
    r = task.reward
    path = reward_dir(task, cfg.paths.cache_dir)

    def build(tmp: Path) -> dict:
        init = None
        lora = {k: as_plain(r.lora)[k] for k in LORA_KEYS} if r.lora.enabled else None
        if r.init_from_sft:  # the RM's base, SFT-trained on the same pooled set with its own tokenizer
            base_task = build_task(task, r.model, cfg.paths.cache_dir, cfg.paths.output_dir)
            init = str(sft_reference(base_task, r.model, task.sft, hw, cache_dir=cfg.paths.cache_dir,
                                     make_logger=lambda: stage_logger(cfg, "reward-sft"), fast_dev_run=fast_dev_run,
                                     lora=lora, log_every_n_steps=cfg.logger.log_every_n_steps) / "model")
        L.seed_everything(int(r.seed), workers=True, verbose=False)
        tok = get_tokenizer(r.model)
        model = load_reward_model(r.model, path=init, pad_token_id=tok.pad_token_id).train()  # from_pretrained gives eval mode
        # With LoRA, the score head is new: it trains in full beside the adapters.
        model = prepare_model(model, activation_checkpointing=hw.activation_checkpointing, strategy=hw.strategy,
                              lora=lora, seed=int(r.seed), trainable=score_head_names(model) if lora else ())
        train, val = reward_pairs(task, tok, "train"), reward_pairs(task, tok, "val")
        acc = accumulation(r.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes,
                           keys=("task.reward.global_batch_size", "hardware.per_device_batch_size"))
        # The pairs left over after an epoch's last whole batch are skipped; a batch they cannot fill once stops here.
        _, planned = plan_steps(len(train), int(r.global_batch_size), what="golden-RM training pairs",
                                batch_key="task.reward.global_batch_size", epochs=int(r.epochs),
                                unit=hw.per_device_batch_size * hw.devices * hw.num_nodes)
        train_loader = pair_loader(train, batch_size=hw.per_device_batch_size, seed=int(r.seed),
                                   pad_id=tok.pad_token_id, num_workers=hw.num_workers, accumulate=acc)
        val_loader = DataLoader(val, batch_size=hw.per_device_batch_size, shuffle=False,
                                collate_fn=pair_collator(tok.pad_token_id), num_workers=hw.num_workers)
        module = RewardModule(model, lr=r.lr, weight_decay=r.weight_decay, warmup_steps=r.warmup_steps,
                              schedule=r.schedule)
        logger = stage_logger(cfg, "reward")
        try:
            trainer = build_trainer(hw, max_steps=-1, max_epochs=int(r.epochs), accumulate=acc, run_dir=run_dir(cfg),
                                    logger=logger, callbacks=[], gradient_clip_val=r.gradient_clip_val,
                                    fast_dev_run=fast_dev_run, model=model,
                                    log_every_n_steps=cfg.logger.log_every_n_steps)
            # build_trainer has no val_check_interval argument; Lightning reads this attribute when fit starts.
            vci = r.val_check_interval
            trainer.val_check_interval = 1.0 if isinstance(vci, int) and vci > len(train_loader) else vci
            fit(trainer, module, train_loader, val_loader)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reward/")}
        finally:
            finish_logger(logger)
        check_steps(trainer.global_step, None if fast_dev_run else planned)  # never publish an untrained RM
        whole = full_state_dict(trainer)  # FSDP: each rank holds a shard; gathering is a collective
        if not trainer.is_global_zero:
            return {}
        merge_adapters(model).save_pretrained(tmp / "model", state_dict=whole)  # scoring loads a plain model
        tok.save_pretrained(tmp / "model")
        print(f"[isdpo] golden RM: validation accuracy {metrics.get('reward/val_accuracy', float('nan')):.3f} "
              f"on {len(val)} pairs after {trainer.global_step} steps")
        return {"val_accuracy": metrics.get("reward/val_accuracy"), "val_loss": metrics.get("reward/val_loss"),
                "metrics": metrics, "n_train": len(train), "n_val": len(val), "steps": trainer.global_step,
                "init": init or r.model.pretrained, "model": as_plain(r.model), "key": reward_key(task)}

    out, reused = publish(path, build, fast_dev_run=fast_dev_run, what="golden reward model")
    print(f"[isdpo] golden RM {'reused' if reused else 'trained'}: {out}")
    return out
