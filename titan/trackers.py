"""Experiment trackers beside TensorBoard: Weights & Biases (`[metrics] wandb = true`, the `wandb` extra) and MLflow
(`mlflow = true`, the `mlflow` extra). They receive exactly the scalars TensorBoard gets, under the same tags
(`train/loss`, `throughput/tps`, `val/loss`, ...) and steps; the run's name and its resolved config are recorded.

Only global rank 0 creates them (MetricsLogger is rank 0's). Offline use is the libraries' own: `WANDB_MODE=offline`
keeps a W&B run in `<dir>/wandb/offline-run-*` for a later `wandb sync`; MLflow writes to `MLFLOW_TRACKING_URI`, by
default a file store `<dump_folder>/mlruns`. A tracker whose package is missing is one line naming the extra.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from titan.config import Metrics
from titan.errors import ConfigError

logger = logging.getLogger("titan")


def flatten(details: dict, prefix: str, sep: str = "/") -> dict:
    """{"expert_load": {"layers.0": {"imbalance": 1.2, "tokens": [...]}}} -> {"train/expert_load/layers.0/imbalance":
    1.2, ...}: scalars and lists under joined tags (a config's dotted keys with sep=".")."""
    out = {}
    for k, v in details.items():
        key = f"{prefix}{sep}{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


class WandB:
    def __init__(self, cfg: Metrics, dump_folder: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError('metrics.wandb needs the wandb package: pip install -e ".[wandb]"') from None
        self.run = wandb.init(project=cfg.wandb_project, name=name, config=config,
                              dir=os.environ.get("WANDB_DIR") or dump_folder, reinit="create_new")
        logger.info(f"metrics: W&B run {name} ({os.environ.get('WANDB_MODE', 'online')}) in {self.run.dir}")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, cfg: Metrics, dump_folder: str, name: str, config: dict):
        try:
            import mlflow
        except ImportError:
            raise ConfigError('metrics.mlflow needs the mlflow package: pip install -e ".[mlflow]"') from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A file store beside the run: what mlflow-skinny can write without a server or a database (MLflow 3
            # keeps it in maintenance mode and asks for this opt-in). Set MLFLOW_TRACKING_URI for a server or sqlite.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(dump_folder).resolve() / "mlruns").as_uri())
        mlflow.set_experiment(cfg.mlflow_experiment)
        self.run = mlflow.start_run(run_name=name)
        params = {k: str(v)[:500] for k, v in flatten(config, "", ".").items()}
        mlflow.log_params(params)
        logger.info(f"metrics: MLflow run {name} at {mlflow.get_tracking_uri()}")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(cfg: Metrics, dump_folder: str, config: dict | None) -> list:
    """The trackers [metrics] asks for (rank 0 only: the caller's business), named metrics.run_name or after the
    dump folder."""
    name = cfg.run_name or Path(dump_folder).resolve().name
    out = []
    try:
        if cfg.wandb:
            out.append(WandB(cfg, dump_folder, name, config or {}))
        if cfg.mlflow:
            out.append(MLflow(cfg, dump_folder, name, config or {}))
    except BaseException:
        for tracker in out:
            tracker.close()
        raise
    return out
