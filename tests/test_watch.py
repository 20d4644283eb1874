"""Watching a training run: the progress line in Prefect's logs and a progress artifact, the
TensorBoard run (grouped tags, the Fig. 2 layout, hparams, its name) synced on the metrics
cadence, wandb (offline) and MLflow (a local SQLite store), the missing-extra error, item loops
quiet off a terminal, and the Training section of `regdpo report`."""

from __future__ import annotations

import io
import json
import re
import struct
import sys
from pathlib import Path

import pytest

from infra.progress import Progress
from infra.store import Store
from models.tiny import build_tiny
from models.wan import WanSpec, transformer_config
from pairs_data import write_random_pairs

# step k/N: loss …, L_dpo …, L_sft …, DGR …, win_gap …, lose_gap … | s/step, ETA
PROGRESS_LINE = re.compile(r"^step (\d+)/(\d+): loss \S+, L_dpo \S+, L_sft \S+, DGR \S+, "
                           r"win_gap \S+, lose_gap \S+ \| \S+ s/step, ETA \S+")


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny("t2v", tmp_path_factory.mktemp("wan") / "t2v")


def _config(model: str, **over) -> dict:
    return dict(model=model, kind="t2v", dtype="float32", steps=4, log_every=2,
                lora=dict(rank=4, alpha=8), optimizer=dict(lr=1e-3, weight_decay=0.0),
                checkpoint=dict(every=4)) | over


def _pairs(tmp_path: Path, model: str) -> tuple[Store, str]:
    st = Store(str(tmp_path / "store"))
    return st, write_random_pairs(st, "data/pairs", transformer_config(WanSpec("t2v", model)), 4)


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_a_train_run_is_watchable_in_prefect_tensorboard_and_the_report(prefect_api, tiny_t2v,
                                                                       tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                ArtifactFilterType, FlowRunFilter,
                                                FlowRunFilterName, LogFilter,
                                                LogFilterFlowRunId)
    from prefect.logging.handlers import APILogWorker
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    from flows.train import train
    from tasks.report import render_report

    st, uri = _pairs(tmp_path, tiny_t2v)
    result = train(run="w", config=_config(tiny_t2v), store=st.url, pairs=uri)
    APILogWorker.drain_all(timeout=30)  # the run's logs, all in the API

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["train/w"])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]), flow_run_id=ArtifactFilterFlowRunId(
                any_=[run.id])))
    steps = [m.group(1, 2) for m in map(PROGRESS_LINE.match, (log.message for log in logs)) if m]
    assert steps == [("2", "4"), ("4", "4")]  # every train.log_every steps, and the last
    assert [a.data for a in progress] == [100.0]
    assert re.match(r"training w-regdpo: step 4/4, \S+ s/step, ETA 00:00 \| loss \S+, L_dpo \S+, "
                    r"L_sft \S+, DGR \S+, win_gap \S+, lose_gap \S+$", progress[0].description)

    # TensorBoard: one run named after the Prefect run and the loss, grouped tags, layout, hparams.
    tb = Path(st.path(st.key_of(result["tensorboard"])))
    assert [p.name for p in tb.iterdir()] == ["w-regdpo"]
    acc = _events(tb / "w-regdpo")
    tags = set(acc.Tags()["scalars"])
    assert {"fig2/dgr", "fig2/win_gap", "fig2/lose_gap", "fig2/dpo_loss", "loss/loss",
            "errors/err_win", "optim/lr", "system/step_time"} <= tags
    assert all("/" in t for t in tags)  # nothing in a flat, ungrouped section
    assert [e.step for e in acc.Scalars("fig2/dgr")] == [1, 2, 3, 4]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    fig2 = next(c for c in layout.category if c.title.startswith("Fig. 2"))
    charts = {tuple(c.multiline.tag) for c in fig2.chart}
    assert ("fig2/win_gap", "fig2/lose_gap") in charts
    hp = plugin_data_pb2.HParamsPluginData()
    hp.ParseFromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = {k: (v.number_value or v.string_value) for k, v in hp.session_start_info.hparams.items()}
    assert values["loss.kind"] == "regdpo" and values["lora.rank"] == 4 and values["steps"] == 4

    # The report's Training section, from the stage's manifest row and its metrics.jsonl.
    text = render_report(st, "w")
    section = text[text.index("## Training"):]
    assert "- steps: 4 (0 skipped" in section and "collapse guard: never fired" in section
    assert st.uri(st.key_of(result["adapter"])) in section
    assert st.uri(st.key_of(result["fig2"])) in section
    last = json.loads(st.read_bytes(st.key_of(result["metrics"])).decode().splitlines()[-1])
    assert "Final metrics (step 4)" in section and f"{last['dgr']:.4g}" in section


def test_tensorboard_and_metrics_reach_the_store_between_checkpoints(tiny_t2v, tmp_path):
    from tasks.train import TrainConfig, train

    st, uri = _pairs(tmp_path, tiny_t2v)
    cfg = TrainConfig.model_validate(_config(tiny_t2v, data=st.key_of(uri), log_every=1,
                                             log_sync_s=0, checkpoint=dict(every=100)))
    seen = {}

    def look(p: dict) -> None:  # called by the trainer after step p["step"] is logged
        if p["step"] == 2:
            lines = st.read_bytes("runs/sync/metrics.jsonl").decode().splitlines()
            seen["jsonl"] = [json.loads(line)["step"] for line in lines]
            seen["tb"] = [e.step for e in _events(Path(st.path("runs/sync/tensorboard/r"))).Scalars(
                "fig2/dgr")]

    train(cfg, st, "runs/sync", run_name="r", on_progress=look)
    assert seen == {"jsonl": [1, 2], "tb": [1, 2]}  # no checkpoint was written before step 4


def test_wandb_offline_and_mlflow_sqlite_record_the_run(tiny_t2v, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'regdpo[tracking]'")
    pytest.importorskip("mlflow", reason="pip install 'regdpo[tracking]'")
    from mlflow import MlflowClient

    from tasks.train import TrainConfig, train

    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    st, uri = _pairs(tmp_path, tiny_t2v)
    cfg = TrainConfig.model_validate(_config(tiny_t2v, data=st.key_of(uri), steps=3,
                                             report_to=["tensorboard", "wandb", "mlflow"]))
    train(cfg, st, "runs/t", run_name="t-regdpo")

    [offline] = Path(st.path("runs/t/wandb")).glob("offline-run-*")  # offline: nothing was sent
    [records] = [wandb_records(p) for p in offline.glob("run-*.wandb")]
    assert [r.run.display_name for r in records if r.HasField("run")] == ["t-regdpo"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    assert [h["_step"] for h in history if "fig2/dgr" in h] == [1, 2, 3]
    summary = {i.key or "/".join(i.nested_key) for r in records if r.HasField("summary")
               for i in r.summary.update}
    assert {"final/dgr", "fig2/win_gap", "errors/err_ref_win"} <= summary

    client = MlflowClient(tracking_uri=f"sqlite:///{st.path('runs/t/mlflow/mlflow.db')}")
    [run] = client.search_runs([client.get_experiment_by_name("regdpo").experiment_id])
    assert run.info.run_name == "t-regdpo" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dgr")] == [1, 2, 3]
    assert run.data.params["loss.kind"] == "regdpo"
    assert [p.name for p in Path(st.path("runs/t/tensorboard")).iterdir()] == ["t-regdpo"]


def wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file: wandb's protobuf Records in LevelDB's log
    framing (32 KiB blocks of [crc32c:4][length:2][type:1] chunks) after a 7-byte file header;
    wandb ships no Python reader any more (its core is Go)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, chunks, records = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + header])
        chunks += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_a_tracker_without_its_package_names_the_extra(monkeypatch):
    import infra.tracking as tracking
    from flows.preflight import PreflightError, preflight
    from infra.config import load_config

    monkeypatch.setitem(tracking.PACKAGES, "wandb", "regdpo_test_no_such_package")
    with pytest.raises(ImportError, match=re.escape("pip install 'regdpo[tracking]'")):
        tracking.make_trackers(["tensorboard", "wandb"], Path("."), "r", {})
    config = load_config(None, ["train.report_to=[tensorboard, wandb]"])
    with pytest.raises(PreflightError) as e:
        preflight(config, ["train"])
    [problem] = [p for p in e.value.problems if "report_to" in p]
    assert "['wandb']" in problem and "regdpo[tracking]" in problem
    assert not [p for p in _problems(load_config(None, ["train.report_to=[tensorboard]"]))
                if "report_to" in p]


def _problems(config) -> list[str]:
    from flows.preflight import PreflightError, preflight

    try:
        preflight(config, ["train"])
    except PreflightError as e:
        return e.problems
    return []


def test_item_loops_log_count_rate_and_eta_and_draw_a_bar_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, bar in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        lines: list[str] = []
        p = Progress(3, "filter", lines.append, every_s=0.0, unit="clip")
        for _ in range(3):
            p.update(1)
        p.close()
        assert bool(stream.getvalue()) is bar, stream.getvalue()
        assert [line.split(",")[0] for line in lines] == [
            "filter: 1/3 clips (33%)", "filter: 2/3 clips (67%)", "filter: 3/3 clips (100%)"]
        assert all(re.search(r"\S+ clips/s, ETA \S+", line) for line in lines)
