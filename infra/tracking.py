"""Experiment trackers of the training loop (`train.report_to`, as diffusers and TRL users know
it): TensorBoard always works (torch ships the writer); wandb (offline: no network) and MLflow
(a local SQLite store; MLflow 3 refuses its old `./mlruns` file store) come with `pip install 'regdpo[tracking]'`.

Each tracker writes under a local dir that `MetricsLog` uploads to `<out>/<tracker dir>` in the
store on the metrics cadence: `tensorboard --logdir`, `wandb sync` and `mlflow ui
--backend-store-uri` read the copies. Metric names are the trainer's (losses/ and
docs/architecture.md); TensorBoard groups them by `TAG_GROUPS`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> import name
EXTRA = "pip install 'regdpo[tracking]'"

# TensorBoard sections: the paper's Fig. 2 quantities first, then the rest by kind.
TAG_GROUPS = {
    "fig2": ("dgr", "r", "dgr_plus_r", "win_gap", "lose_gap", "s", "dpo_loss"),
    "loss": ("loss", "sft_term", "nll_term", "kto_loss", "kl", "reward", "reward_desirable",
             "reward_undesirable", "implicit_acc", "region_loss"),
    "errors": ("err_win", "err_lose", "err_ref_win", "err_ref_lose", "err", "err_ref",
               "err_real", "n_desirable", "n_undesirable"),
    "optim": ("lr", "grad_norm", "skipped", "skipped_total", "collapse", "epoch"),
    "system": ("step_time", "peak_mem"),
}
_GROUP_OF = {name: group for group, names in TAG_GROUPS.items() for name in names}
# The custom-scalars layout (TensorBoard's "Custom Scalars" tab): Fig. 2 as the paper draws it.
LAYOUT = {
    "Fig. 2 (Reg-DPO paper)": {
        "DGR, r and DGR + r": ["Multiline", ["fig2/dgr", "fig2/r", "fig2/dgr_plus_r"]],
        "win_gap and lose_gap": ["Multiline", ["fig2/win_gap", "fig2/lose_gap"]],
        "s = win_gap - lose_gap": ["Multiline", ["fig2/s"]],
        "L_dpo and the total loss": ["Multiline", ["fig2/dpo_loss", "loss/loss"]],
    },
    "Optimisation": {
        "learning rate": ["Multiline", ["optim/lr"]],
        "gradient norm": ["Multiline", ["optim/grad_norm"]],
        "step time and peak memory": ["Multiline", ["system/step_time", "system/peak_mem"]],
    },
}


def tag(name: str) -> str:
    """The TensorBoard tag of a metric: `<group>/<name>` (unknown metrics go to `train/`)."""
    return f"{_GROUP_OF.get(name, 'train')}/{name}"


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (bools as 0/1), without `step`."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}


def missing_packages(report_to: list[str]) -> list[str]:
    """The trackers of `report_to` whose package is not importable here."""
    from importlib.util import find_spec

    return [t for t in report_to if t in PACKAGES and find_spec(PACKAGES[t]) is None]


class Tracker:
    """start(step) once (after a resume: the step it resumes from), log(step, metrics) per step,
    flush() on the metrics cadence, close(final) at the end. `dir` is what gets uploaded."""

    dir: str

    def __init__(self, local: Path, run_name: str, hparams: dict[str, Any]):
        self.local, self.run_name, self.hparams = local, run_name, hparams

    def start(self, step: int) -> None: ...
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self, final: dict[str, float]) -> None: ...


class TensorBoardTracker(Tracker):
    """Grouped tags, the Fig. 2 custom-scalars layout and hparams, in `tensorboard/<run name>`
    (TensorBoard names a run by its dir under --logdir)."""

    dir = "tensorboard"

    def start(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops a killed run's events from this step on.
        self.writer = SummaryWriter(str(self.local / self.dir / self.run_name),
                                    purge_step=step + 1)
        self.writer.add_custom_scalars(LAYOUT)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(tag(name), value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, final: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The hparams plugin's three summaries in this run's own file (add_hparams would make a
        # second run dir); the final metrics are its columns.
        metrics = {f"final/{k}": v for k, v in final.items()}
        for summary in hparams(_hparam_values(self.hparams), metrics):
            self.writer.file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v)
        self.writer.close()


class WandbTracker(Tracker):
    """wandb in offline mode unless WANDB_MODE says otherwise; `wandb sync <out>/wandb/...`
    uploads the copy later."""

    dir = "wandb"

    def start(self, step: int) -> None:
        import wandb

        (self.local / self.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "regdpo"),
                              name=self.run_name, dir=str(self.local),
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              config=self.hparams, resume="allow" if step else None,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({tag(k): v for k, v in metrics.items()}, step=step)

    def close(self, final: dict[str, float]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        self.run.finish()


class MlflowTracker(Tracker):
    """MLflow into a local SQLite store (`mlflow/mlflow.db`; `mlflow ui --backend-store-uri
    sqlite:///<copy>/mlflow.db` reads the store's copy), or MLFLOW_TRACKING_URI when it is set."""

    dir = "mlflow"

    def start(self, step: int) -> None:
        import mlflow

        db = self.local / self.dir / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{db.resolve()}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "regdpo")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
        for k, v in _hparam_values(self.hparams).items():
            self.client.log_param(self.run_id, k, v)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, final: dict[str, float]) -> None:
        self.log(0, {f"final_{k}": v for k, v in final.items()})
        self.client.set_terminated(self.run_id)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _hparam_values(hparams: dict[str, Any]) -> dict[str, Any]:
    """Flat `a.b` keys with values TensorBoard/MLflow take (numbers, strings, bools)."""
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        if isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in _hparam_values(v).items()}
        elif isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif v is not None:
            out[k] = str(v)
    return out


def make_trackers(report_to: list[str], local: Path, run_name: str,
                  hparams: dict[str, Any]) -> list[Tracker]:
    """The trackers of `report_to`; a missing package is an error naming the extra."""
    if missing := missing_packages(report_to):
        raise ImportError(f"train.report_to lists {missing} but the package(s) "
                          f"{[PACKAGES[m] for m in missing]} are not installed: {EXTRA}")
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    return [kinds[t](local, run_name, hparams) for t in dict.fromkeys(report_to)]
