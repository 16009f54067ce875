"""W&B for the train stage: rank 0 starts the run itself, so no W&B failure can fail training.

transformers' WandbCallback reuses the run started here. Online first; when that fails (no network on the
compute nodes, a key the server refuses) offline files under <point>/wandb for `wandb sync`; when even that
fails, TensorBoard only. Each fallback is a stage warning (status/train.json, `status`, the report).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stage_warnings import stage_warning


def start_wandb(paths: PointPaths, run_name: str) -> bool:
    """Start the W&B run on rank 0 (transformers' WandbCallback then reuses it). Online first; if that fails
    (no network on compute nodes, a refused key), offline files under <point>/wandb for `wandb sync`; if even
    that fails, False: TensorBoard only. Every fallback is a stage warning, never an exception."""
    if importlib.util.find_spec("wandb") is None:
        stage_warning("wandb: WANDB_API_KEY is set but wandb is not installed (pip install 'gptoss_hpc[wandb]'); "
                      "logging to TensorBoard only")  # fmt: skip
        return False
    import wandb

    (paths.root / "wandb").mkdir(exist_ok=True)
    init = {"project": os.environ["WANDB_PROJECT"], "name": run_name, "dir": str(paths.root)}
    try:
        wandb.init(**init)
        return True
    except Exception as exc:  # wandb raises CommError, AuthenticationError, UsageError ... and worse
        reason = _first_line(exc)
    if os.environ.get("WANDB_MODE", "").lower() != "offline":
        try:
            run = wandb.init(**init, mode="offline")
            os.environ["WANDB_MODE"] = "offline"  # what WandbCallback and any later init in this job see
            stage_warning(
                f"wandb: online run failed ({reason}); logging offline to {Path(run.dir).parent} "
                f"(upload it later: wandb sync {Path(run.dir).parent}) and to TensorBoard"
            )
            return True
        except Exception as exc:
            reason += f"; offline too: {_first_line(exc)}"
    stage_warning(f"wandb: could not start a run ({reason}); logging to TensorBoard only")
    return False


def finish_wandb() -> None:
    """Close this process's W&B run, if any (a failure to upload is a warning: the run's files stay local)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish()
    except Exception as exc:
        stage_warning(f"wandb: finishing the run failed ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    """`Type: first line`, with no secret value in it (wandb errors could echo a header or a key)."""
    from gptoss_hpc.secrets import values

    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    for value in values():
        text = text.replace(value, "***")
    return text
