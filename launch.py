"""isdpo's entry point: compose the config with Hydra, validate it, run the selected stage.

    python launch.py                                   # the embedded default (pipeline, synthetic, CPU)
    python launch.py -m loss=isdpo,dpo beta=0.01,0.05,0.1   # a sweep: one folder per job under multirun/
"""
import logging
import os

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from isdpo.resolvers import register as register_resolvers
from isdpo.schema import store as store_schemas

# Hydra's root handler and Lightning's own handler would print every Lightning line twice.
logging.getLogger("lightning.pytorch").propagate = False
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Resolved in this process when Hydra composes (run dir, launcher settings), before any job starts.
register_resolvers()
# The schemas the conf/ files extend (`- /schema/<name>@_here_`); they travel to submitit's jobs with Hydra's state.
store_schemas(ConfigStore.instance())


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    # Imported here, not at the top: `--help`, `--cfg` and a multirun's parent process never load torch.
    from isdpo.config import validate
    from isdpo.stages import run_stage

    validate(cfg)
    result = run_stage(cfg)
    if isinstance(result, dict) and result.get("final"):
        f, p = result["final"], result["peak"]
        print(f"[isdpo] {cfg.run_name}: final win rate {f['win_rate']:.3f} (step {f['step']}), "
              f"peak {p['win_rate']:.3f} (step {p['step']}), final KL {f['kl']:.3f}")
        print(f"[isdpo] results: {cfg.paths.output_dir}/result.json, curve: {cfg.paths.output_dir}/metrics.jsonl")
    return result.get("final", {}).get("win_rate") if isinstance(result, dict) and result.get("final") else None


if __name__ == "__main__":
    main()
