"""flows/train.py under a throw-away Prefect API, on a tiny random Wan T2V and random pairs;
infra/plots.py; the `train` section of the run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infra.config import ConfigError, load_config
from infra.plots import FIG2_PANELS, compare_panels, fig2_panels
from infra.store import Store
from models.tiny import build_tiny
from models.wan import WanSpec
from infra.config import TrainConfig
from models.wan import transformer_config
from pairs_data import write_random_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny("t2v", tmp_path_factory.mktemp("wan") / "t2v")


def _config(model: str, **over) -> dict:
    # AdamW's eps well above float32 rounding of the gradients: with the default 1e-8 an element
    # whose gradient is ~0 moves by ±lr on the sign of its rounding noise, so two layouts that
    # sum in another order (pair parallel, two nodes) could differ by 2·lr in that element.
    return dict(model=model, kind="t2v", dtype="float32", steps=3, lora=dict(rank=4, alpha=8),
                optimizer=dict(lr=1e-3, weight_decay=0.0, eps=1e-4),
                checkpoint=dict(every=2)) | over


def _rows(n: int, **extra) -> list[dict]:
    return [{"step": i + 1, "dgr": 125.0 - i, "r": 125.0 - i, "dgr_plus_r": 250.0 - 2 * i,
             "win_gap": 0.01 * i, "lose_gap": 0.02 * i, "s": -0.01 * i, "dpo_loss": 0.69,
             **extra} for i in range(n)]


def test_fig2_panels_write_a_png_with_one_axes_per_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(len(fig.axes)), real_savefig(fig, *a, **k)))
    rows = _rows(20)
    rows[5]["dgr"] = None  # a skipped step: a gap, not a crash
    one = fig2_panels(rows, tmp_path / "one.png", "run")
    both = compare_panels({"DPO": rows, "Reg-DPO": _rows(10)}, tmp_path / "sub" / "both.png")
    for png in (one, both):
        data = Path(png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert saved == [len(FIG2_PANELS)] * 2 == [7, 7]


def test_train_section_of_the_run_config():
    cfg = load_config(None, ["train.steps=5", "train.loss.kind=dpo"])
    assert isinstance(cfg.train, TrainConfig) and cfg.train.steps == 5
    assert load_config(None).train is None
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.loss.beta=-1", "train.lora.rank=0"])
    assert "train.loss" in str(e.value) and "beta" in str(e.value)
    assert "train.lora.rank" in str(e.value)


def test_train_flow_trains_plots_and_records_the_stage(prefect_api, tiny_t2v, tmp_path):
    from prefect.artifacts import Artifact

    from flows.train import train

    st = Store(str(tmp_path / "store"))
    uri = write_random_pairs(st, "data/pairs", transformer_config(WanSpec("t2v", tiny_t2v)), 4)
    result = train(run="t", config=_config(tiny_t2v), store=st.url, pairs=uri)

    adapter = load_file(st.path(st.key_of(result["adapter"])))
    assert adapter and all(k.startswith("transformer.") for k in adapter)
    lines = st.read_bytes(st.key_of(result["metrics"])).decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert st.read_bytes(st.key_of(result["fig2"])).startswith(PNG_MAGIC)
    assert st.list(st.key_of(result["tensorboard"]))

    stage = st.read_run("t")["stages"]["train"]
    assert stage["key"] == result["key"] and stage["counts"]["ok"] == 1
    assert stage["config"]["data"] == "data/pairs"  # a UI re-run finds the same pairs
    report = Artifact.get("t-train-report")
    assert report is not None and result["adapter"] in report.data
    assert Artifact.get("t-train-last-step") is not None

    again = train(run="t", config=_config(tiny_t2v), store=st.url, pairs=uri)
    assert again["adapter"] == result["adapter"] and again["key"] == result["key"]


def test_collapse_is_surfaced_in_the_report():
    from flows.train import collapse_note

    assert collapse_note(_rows(5)) == ""
    note = collapse_note(_rows(5)[:3] + _rows(5, collapse=True)[3:])
    assert "Collapse signature" in note and "first at step 4" in note


@pytest.mark.slow
def test_train_flow_with_two_processes_matches_one(prefect_api, tiny_t2v, tmp_path):
    """nproc=2 launches torchrun (2 CPU ranks on gloo: pair parallel + FSDP); rank 0 alone writes
    the log and the adapter, which equals the one-process run's."""
    from flows.train import train
    from tasks.train import train as train_loop

    st = Store(str(tmp_path / "store"))
    uri = write_random_pairs(st, "data/pairs", transformer_config(WanSpec("t2v", tiny_t2v)), 4)
    config = _config(tiny_t2v, batch_size=2, parallel=dict(pair_parallel=True, fsdp=True))
    result = train(run="t", config=config, store=st.url, pairs=uri, nproc=2)

    lines = st.read_bytes(st.key_of(result["metrics"])).decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # one writer, no duplicates
    assert st.read_run("t")["stages"]["train"]["counts"]["ok"] == 1
    plain = config | {"data": "data/pairs", "parallel": {}}
    one = train_loop(TrainConfig.model_validate(plain), st, "one")
    got = load_file(st.path(st.key_of(result["adapter"])))
    want = load_file(st.path(st.key_of(one["adapter"])))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(prefect_api, tiny_t2v, tmp_path):
    """nnodes=2: one train flow per "node" (two threads, one process each, gloo), meeting at a
    c10d rendezvous; node 0 commits the stage, node 1 only trains; the adapter equals one
    process's with the same global batch."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from flows.train import train
    from tasks.train import train as train_loop

    st = Store(str(tmp_path / "store"))
    uri = write_random_pairs(st, "data/pairs", transformer_config(WanSpec("t2v", tiny_t2v)), 4)
    config = _config(tiny_t2v, batch_size=2, parallel=dict(pair_parallel=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ThreadPoolExecutor(2) as pool:
        nodes = [pool.submit(train, run="t", config=config, store=st.url, pairs=uri, nproc=1,
                             nnodes=2, node_rank=rank, rdzv=f"127.0.0.1:{port}")
                 for rank in (0, 1)]
        first, second = (f.result(timeout=600) for f in nodes)

    assert first["counts"]["ok"] == 1 and second["node_rank"] == 1 and not second["manifest"]
    assert st.read_run("t")["stages"]["train"]["counts"]["ok"] == 1
    assert second["adapter"] == st.key_of(first["adapter"])  # one adapter, every node's answer
    lines = st.read_bytes(st.key_of(first["metrics"])).decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # one writer
    one = train_loop(TrainConfig.model_validate(config | {"data": "data/pairs", "parallel": {}}),
                     st, "one")
    got = load_file(st.path(st.key_of(first["adapter"])))
    want = load_file(st.path(st.key_of(one["adapter"])))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("nnodes, node_rank, rdzv, match", [
    (2, 0, None, "HOST:PORT"), (2, 0, "node0", "HOST:PORT"), (2, 0, "node0:99999", "HOST:PORT"),
    (2, 2, "node0:29400", r"not in 0\.\.1"), (1, 0, "node0:29400", "nnodes > 1"),
    (0, 0, None, ">= 1")])
def test_a_bad_multi_node_launch_names_the_fix(prefect_api, tiny_t2v, tmp_path, nnodes,
                                               node_rank, rdzv, match):
    from flows.train import train

    with pytest.raises(ValueError, match=match):
        train(run="t", config=_config(tiny_t2v), store=str(tmp_path / "store"), nnodes=nnodes,
              node_rank=node_rank, rdzv=rdzv)
    assert not (tmp_path / "store" / "runs").exists()  # refused before any work


def test_a_layout_that_does_not_fit_nproc_fails_before_any_work(prefect_api, tiny_t2v, tmp_path):
    from flows.train import train

    config = _config(tiny_t2v, parallel=dict(context_parallel=2))
    with pytest.raises(ValueError, match="multiple of 2"):
        train(run="t", config=config, store=str(tmp_path / "store"), nproc=3)
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.slow
def test_a_failed_launch_fails_the_flow_with_the_tail_of_its_output(prefect_api, tiny_t2v,
                                                                    tmp_path):
    from flows.train import train

    import shutil

    st = Store(str(tmp_path / "store"))
    uri = write_random_pairs(st, "data/pairs", transformer_config(WanSpec("t2v", tiny_t2v)), 4)
    # A missing model is found before any launch (its weight identity is in the stage key).
    with pytest.raises(ValueError, match="no-such-model.*is not available"):
        train(run="t", config=_config(str(tmp_path / "no-such-model"), batch_size=2),
              store=st.url, pairs=uri, nproc=2)
    # Weights that exist but do not load fail inside the launched processes.
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_t2v, broken)
    for shard in (broken / "transformer").glob("*.safetensors"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    with pytest.raises(RuntimeError, match=r"(?s)exit code [1-9].*(safetensors|header|deserializ)"):
        train(run="t", config=_config(str(broken), batch_size=2), store=st.url, pairs=uri, nproc=2)
    assert "train" not in (st.read_run("t") or {}).get("stages", {})


def test_missing_pairs_say_what_to_run(prefect_api, tiny_t2v, tmp_path):
    from flows.train import train

    with pytest.raises(LookupError, match="no committed 'precompute' stage"):
        train(run="t", config=_config(tiny_t2v), store=str(tmp_path / "store"))
