"""isdpo's entry point: compose the config with Hydra, validate it, run the selected stage.

    python launch.py                                   # the embedded default (pipeline, synthetic, CPU)
    python launch.py -m loss=isdpo,dpo beta=0.01,0.05,0.1   # a sweep: one folder per job under multirun/
"""
import logging
import os
import warnings

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from isdpo.resolvers import register as register_resolvers
from isdpo.schema import store as store_schemas

# Hydra's root handler and Lightning's own handler would print every Lightning line twice.
logging.getLogger("lightning.pytorch").propagate = False
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# conf/hydra/launcher/joblib.yaml shares the plugin's name on purpose (`hydra/launcher=joblib` gets our defaults)
# and Hydra 1.3 checks it against the plugin's schema, as intended, with a deprecation notice on every run.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema")


# Resolved in this process when Hydra composes (run dir, launcher settings), before any job starts.
register_resolvers()
# The schemas the conf/ files extend (`- /schema/<name>@_here_`); they travel to submitit's jobs and joblib's workers
# with Hydra's state (so do the resolvers).
store_schemas(ConfigStore.instance())


class UserError(CompactHydraException):
    """A mistake in the config, the data or the paths: Hydra prints this message alone, without a traceback."""


def user_error(err: BaseException) -> UserError:
    """``err`` as the one message a user sees (ISDPO_TRACEBACK=1: the error itself, with its traceback)."""
    return UserError(f"[isdpo] error: {err}\n(ISDPO_TRACEBACK=1 shows where it was raised)")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    # `lightning`'s own handler prints its lines; without this they would print twice in a worker of
    # hydra/launcher=joblib, which runs this function but not this file's top-level code.
    logging.getLogger("lightning").propagate = False
    # Imported here, not at the top: `--help`, `--cfg` and a multirun's parent process never load torch.
    from isdpo.config import USER_ERRORS, validate
    from isdpo.stages import run_stage
    from isdpo.stages.align import summary

    try:
        validate(cfg)
        result = run_stage(cfg)
    except USER_ERRORS as err:
        if os.environ.get("ISDPO_TRACEBACK", "") not in ("", "0"):
            raise
        raise user_error(err) from None
    if isinstance(result, dict) and result.get("final"):
        print(f"[isdpo] {cfg.run_name}: {summary(result)}")
        print(f"[isdpo] results: {cfg.paths.output_dir}/result.json, curve: {cfg.paths.output_dir}/metrics.jsonl")
    return result.get("final", {}).get("win_rate") if isinstance(result, dict) and result.get("final") else None


if __name__ == "__main__":
    main()
