"""tasks/train.py with infra/checkpoint.py and infra/parallel.py: the Reg-DPO trainer on tiny
random-weight Wan transformers and random latent pairs (F=2, H=W=4 latents, 512 text tokens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from infra.checkpoint import ConfigMismatchError
from infra.store import Store
from models.tiny import build_tiny
from models.wan import WanSpec, load_pipeline, lora_parameters, reference_mode
from infra.config import TrainConfig
from infra.pairs_format import PairDataError
from models.wan import transformer_config
from pairs_data import random_pair, write_pairs, write_random_pairs
from tasks.train import CollapseGuard, Trainer, train

REPO = Path(__file__).resolve().parents[1]
# Fields that are allowed to differ between two runs of the same config.
UNTIMED = ("step_time", "peak_mem")
FIG2 = ("loss", "dpo_loss", "sft_term", "dgr", "r", "dgr_plus_r", "win_gap", "lose_gap", "s",
        "implicit_acc", "err_win", "err_lose", "err_ref_win", "err_ref_lose", "grad_norm", "lr",
        "step_time", "peak_mem", "skipped", "skipped_total", "collapse")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wan")
    return {kind: build_tiny(kind, root / kind) for kind in ("t2v", "i2v")}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config(tiny: dict[str, str], kind: str = "t2v", **over: Any) -> TrainConfig:
    """A tiny, fast config: float32 base, rank-4 LoRA, a large lr so one step moves weights,
    no weight decay (so a weight that changed was moved by its gradient)."""
    base = dict(model=tiny.get(kind, tiny["t2v"]), kind=kind, dtype="float32", data="data/pairs", steps=3,
                lora=dict(rank=4, alpha=8), optimizer=dict(lr=1e-3, weight_decay=0.0),
                checkpoint=dict(every=100))
    return TrainConfig.model_validate(_merge(base, over))


def pairs(store: Store, tiny: dict[str, str], kind: str = "t2v", n: int = 4, **kw: Any) -> None:
    model = transformer_config(WanSpec(kind, tiny[kind]))
    write_random_pairs(store, "data/pairs", model, n, **kw)


def metrics_log(store: Store, out: str) -> list[dict]:
    text = store.read_bytes(f"{out}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def perturb_lora(trainer: Trainer, seed: int = 1) -> None:
    """Random A and B (B starts at 0, which would leave A without gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(trainer.transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def loss_and_grads(trainer: Trainer) -> tuple[dict[str, float], list[torch.Tensor]]:
    metrics = trainer.forward_backward_step(trainer.next_batch(), 1.0)
    grads = [p.grad.clone() for p in lora_parameters(trainer.transformer)]
    trainer.optimizer.zero_grad(set_to_none=True)
    return metrics, grads


def assert_same_gradient(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Equal up to float32 rounding: ‖got − want‖ ≤ 1e-5·‖want‖ over the whole LoRA gradient
    (elementwise tolerances fail on entries that are rounding noise around 0)."""
    assert len(got) == len(want) > 0
    g, w = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    assert w.norm() > 0 and (g - w).norm() <= 1e-5 * w.norm(), ((g - w).norm(), w.norm())


# ---------------------------------------------------------------------------------------
# Training moves the adapter, logs every metric, and saves what diffusers loads
# ---------------------------------------------------------------------------------------


def test_training_moves_every_lora_weight_and_logs_every_metric(tiny, store) -> None:
    pairs(store, tiny)
    cfg = config(tiny, steps=4, optimizer=dict(warmup_steps=2, schedule="cosine"))
    trainer = Trainer(cfg, store, "runs/t/train")
    before = [p.detach().clone() for p in lora_parameters(trainer.transformer)]

    result = trainer.train()

    log = metrics_log(store, "runs/t/train")
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    for line in log:
        assert set(FIG2) <= line.keys()
        assert all(isinstance(line[k], float) for k in FIG2[:18]), line
        assert not line["skipped"] and not line["collapse"]
    first = log[0]  # policy = reference at step 0: s = 0, DGR = b/2 = beta/4 (docs/architecture.md)
    assert first["s"] == 0 and first["dgr"] == pytest.approx(cfg.loss.beta / 4)
    # warmup over 2 updates, then cosine to 0 over the remaining 2: factors 1/2, 1, 1, 1/2
    assert [line["lr"] for line in log] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    after = list(lora_parameters(trainer.transformer))
    unchanged = [i for i, (a, b) in enumerate(zip(before, after)) if torch.equal(a, b)]
    assert not unchanged, f"{len(unchanged)} of {len(after)} LoRA weights never moved"
    assert result["steps"] == 4 and result["skipped"] == 0
    assert store.list("runs/t/train/tensorboard"), "no TensorBoard event file in the store"
    assert store.read_json("runs/t/train/checkpoints/latest.json")["step"] == 4


def test_i2v_region_loss_trains_and_its_adapter_loads_into_diffusers(tiny, store) -> None:
    pairs(store, tiny, "i2v", n=2, mask=True)
    cfg = config(tiny, "i2v", steps=2, loss=dict(kind="region"))
    trainer = Trainer(cfg, store, "runs/t/train")
    before = [p.detach().clone() for p in lora_parameters(trainer.transformer)]

    result = trainer.train()

    assert all(line["loss"] is not None for line in metrics_log(store, "runs/t/train"))
    assert all(not torch.equal(a, b) for a, b in zip(before, lora_parameters(trainer.transformer)))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 36, 2, 4, 4, generator=g),
                  timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 17, 32, generator=g),
                  return_dict=False)
    with torch.no_grad():
        trained = trainer.transformer(**inputs)[0]
        with reference_mode(trainer.transformer):
            base = trainer.transformer(**inputs)[0]
        pipe = load_pipeline(WanSpec("i2v", tiny["i2v"], dtype="float32"))
        pipe.load_lora_weights(store.local_path("runs/t/train/adapter"))
        loaded = pipe.transformer(**inputs)[0]
    assert result["adapter"].endswith("runs/t/train/adapter/pytorch_lora_weights.safetensors")
    assert torch.equal(loaded, trained)
    assert not torch.allclose(trained, base)


def test_win_and_lose_share_one_timestep_and_one_noise(tiny, store) -> None:
    """A pair whose loser is its winner: with (t, ε) shared, both sides are the same sample,
    so s = 0 and e^w = e^l at every step, before and after updates."""
    model = transformer_config(WanSpec("t2v", tiny["t2v"]))
    g = torch.Generator().manual_seed(0)
    data = {f"p{i}": random_pair(model, 2, 4, 4, g) for i in range(2)}
    for pair in data.values():
        pair["lose"] = pair["win"].clone()
    write_pairs(store, "data/pairs", data)
    train(config(tiny, steps=3, loss=dict(kind="sft")), store, "runs/t")

    for line in metrics_log(store, "runs/t"):
        assert line["s"] == pytest.approx(0, abs=1e-6)
        assert line["err_lose"] == pytest.approx(line["err_win"], rel=1e-6)
        assert line["err_ref_lose"] == pytest.approx(line["err_ref_win"], rel=1e-6)


# ---------------------------------------------------------------------------------------
# Switches and accumulation change no numbers
# ---------------------------------------------------------------------------------------


def test_pair_batch_and_gradient_checkpointing_give_the_same_loss_and_grads(tiny, store) -> None:
    """Checkpointing recomputes the same ops: bit-identical. A batch of 2 and two batches of 1
    may round differently in the last bits of the errors, and the loss multiplies those by
    ~b² (b = β/2); β = 4 keeps the comparison about the layout, not about that conditioning."""
    pairs(store, tiny)
    results = {}
    for name, parallel in (("plain", dict(pair_batch=True)), ("separate", dict(pair_batch=False)),
                           ("checkpointed", dict(gradient_checkpointing=True)),
                           ("selective", dict(gradient_checkpointing=True, checkpoint_every=2))):
        cfg = config(tiny, parallel=parallel, loss=dict(beta=4.0))
        trainer = Trainer(cfg, store, f"runs/{name}")
        perturb_lora(trainer)
        results[name] = loss_and_grads(trainer)
    plain_metrics, plain_grads = results["plain"]
    for name in ("checkpointed", "selective"):
        assert results[name][0] == plain_metrics
        assert all(torch.equal(a, b) for a, b in zip(results[name][1], plain_grads))
    metrics, grads = results["separate"]
    assert metrics == pytest.approx(plain_metrics, rel=1e-6, abs=2e-6)
    assert_same_gradient(grads, plain_grads)


def test_attention_switch_picks_sdpa_on_cpu_and_refuses_flash_without_it(tiny, store) -> None:
    """auto/sdpa route every attention through torch SDPA (diffusers' "native" backend) with the
    numbers of the default; flash without flash-attn or CUDA is an error naming the fix."""
    import importlib.util

    from infra.parallel import attention_backend

    pairs(store, tiny)
    results = {}
    for choice in ("auto", "sdpa"):
        trainer = Trainer(config(tiny, parallel=dict(attention=choice)), store, f"runs/{choice}")
        backends = {m.processor._attention_backend for m in trainer.transformer.modules()
                    if hasattr(m, "processor") and hasattr(m.processor, "_attention_backend")}
        assert {str(getattr(b, "value", b)) for b in backends} == {"native"}, backends
        perturb_lora(trainer)
        results[choice] = loss_and_grads(trainer)
    assert results["auto"][0] == results["sdpa"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["auto"][1], results["sdpa"][1]))
    with pytest.raises(ValueError, match="flash"):
        attention_backend("flash", torch.device("cpu"))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match=r"pip install '\.\[gpu\]'"):
            attention_backend("flash", torch.device("cuda"))


def test_selective_checkpointing_recomputes_every_kth_block_only(tiny, store) -> None:
    """checkpoint_every=2 on the 2-block tiny model: block 0 runs under torch.utils.checkpoint
    (its forward runs again in backward), block 1 does not."""
    pairs(store, tiny)
    cfg = config(tiny, parallel=dict(gradient_checkpointing=True, checkpoint_every=2))
    trainer = Trainer(cfg, store, "runs/selective")
    calls = [0, 0]
    for i, block in enumerate(trainer.transformer.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    perturb_lora(trainer)
    loss_and_grads(trainer)
    # 2 reference + 2 policy forwards are batched into 1 + 1; block 0 adds its recompute.
    assert calls == [3, 2]


def test_offloaded_activations_give_the_same_loss_and_grads(tiny, store, monkeypatch) -> None:
    """offload_activations: the saved tensors of the blocks not recomputed go through the host
    copy and back. On CPU the copy is the tensor itself, so here it is a real copy (clone):
    backward then runs on the copies, and the numbers must still be the plain path's."""
    import infra.activations

    copied = []

    def clone(tensor: torch.Tensor) -> torch.Tensor:
        copied.append(tensor.numel())
        return tensor.clone()

    monkeypatch.setattr(infra.activations, "_host_copy", clone)
    pairs(store, tiny)
    results = {}
    for name, parallel in (("plain", dict()), ("offload", dict(offload_activations=True)),
                           ("selective-offload", dict(gradient_checkpointing=True,
                                                      checkpoint_every=2,
                                                      offload_activations=True))):
        trainer = Trainer(config(tiny, parallel=parallel, loss=dict(beta=4.0)), store,
                          f"runs/{name}")
        perturb_lora(trainer)
        copied.clear()
        results[name] = loss_and_grads(trainer), len(copied)
    (plain_metrics, plain_grads), _ = results["plain"]
    for name in ("offload", "selective-offload"):
        (metrics, grads), n_copied = results[name]
        assert metrics == plain_metrics
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    # both blocks offload vs block 1 only (block 0 recomputes): about twice the saved tensors
    assert results["offload"][1] > results["selective-offload"][1] > 0


def test_memory_budget_plans_from_probe_steps_and_changes_no_numbers(tiny, store) -> None:
    """memory_budget_gb: probe steps, then a plan. A budget far above the step stores every
    block; the probes leave no trace (same loss and grads as without a budget, the data cursor
    at 0); a budget below the step with every block recomputed fails before any step."""
    pairs(store, tiny)
    plain = Trainer(config(tiny, loss=dict(beta=4.0)), store, "runs/plain")
    perturb_lora(plain)
    plain_metrics, plain_grads = loss_and_grads(plain)
    planned = Trainer(config(tiny, loss=dict(beta=4.0), parallel=dict(memory_budget_gb=1000.0)),
                      store, "runs/planned")
    plan = planned.memory_plan
    assert (plan.recomputed, plan.offloaded, plan.frames) == (0, 0, 2)
    assert 0 < plan.peak_bytes < plan.budget_bytes
    assert planned.cursor.position == 0
    perturb_lora(planned)
    metrics, grads = loss_and_grads(planned)
    assert metrics == plain_metrics
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    with pytest.raises(ValueError, match=r"memory_budget_gb = 0\.001: .* needs .* GiB"):
        Trainer(config(tiny, parallel=dict(memory_budget_gb=0.001)), store, "runs/small")


def test_accumulating_2x1_equals_one_batch_of_2(tiny, store) -> None:
    """The loss is a mean over pairs and each pair's (t, ε) comes from its own seed, so two
    micro-batches of 1 pair (each scaled by 1/2) give the gradient of one batch of 2 (up to
    rounding, β = 4 as in the test above)."""
    pairs(store, tiny)
    metrics, grads = {}, {}
    for name, (batch, accum) in {"batch": (2, 1), "accum": (1, 2)}.items():
        cfg = config(tiny, batch_size=batch, grad_accum=accum, loss=dict(beta=4.0))
        trainer = Trainer(cfg, store, f"runs/{name}")
        perturb_lora(trainer)
        seen = grads[name] = []  # the gradients the AdamW update is made of
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, seen=seen: seen.extend(
                p.grad.clone() for group in opt.param_groups for p in group["params"]))
        metrics[name] = trainer.train_step()
    for key, value in metrics["batch"].items():
        if key not in UNTIMED:
            assert metrics["accum"][key] == pytest.approx(value, rel=1e-6, abs=2e-6), key
    assert len(grads["accum"]) == len(grads["batch"]) > 0
    assert_same_gradient(grads["accum"], grads["batch"])


# ---------------------------------------------------------------------------------------
# Non-finite steps, bad inputs, bad configs
# ---------------------------------------------------------------------------------------


def test_a_nan_step_is_skipped_and_counted(tiny, store) -> None:
    model = transformer_config(WanSpec("t2v", tiny["t2v"]))
    g = torch.Generator().manual_seed(0)
    data = {f"p{i}": random_pair(model, 2, 4, 4, g) for i in range(3)}
    data["p1"]["win"][0, 0, 0, 0] = float("nan")
    write_pairs(store, "data/pairs", data)
    out = "runs/t/train"  # no shuffle, one pair per step: step 2 sees p1
    train(config(tiny, shuffle=False, checkpoint=dict(every=1)), store, out)

    log = metrics_log(store, out)
    assert [line["skipped"] for line in log] == [False, True, False]
    assert [line["skipped_total"] for line in log] == [0, 1, 1]
    assert log[1]["loss"] is None and log[2]["loss"] is not None
    adapters = [load_file(store.local_path(f"{out}/checkpoints/step-{s:08d}/adapter/"
                                           "pytorch_lora_weights.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # no update
    assert any(not torch.equal(adapters[1][k], adapters[2][k]) for k in adapters[0])


def _bad_pairs(model: dict, i2v_model: dict) -> dict[str, tuple]:
    """case -> (pair-1 tensors, the model kind, extra config, expected message)."""
    g = torch.Generator().manual_seed(0)
    ok = random_pair(model, 2, 4, 4, g)
    return {
        "text dim": ({**ok, "prompt_embeds": torch.zeros(512, 16)}, "t2v", {},
                     "prompt_embeds has shape [512, 16], expected [512, 32]"),
        "channels": ({**ok, "win": torch.zeros(8, 2, 4, 4)}, "t2v", {},
                     "win has shape [8, 2, 4, 4], expected [16, F, H, W]"),
        "patch": ({**ok, "win": torch.zeros(16, 2, 5, 4), "lose": torch.zeros(16, 2, 5, 4)},
                  "t2v", {}, "not divisible by the patch 1×2×2"),
        "lose shape": ({**ok, "lose": torch.zeros(16, 2, 4, 8)}, "t2v", {},
                       "lose has shape [16, 2, 4, 8], expected [16, 2, 4, 4]"),
        "region without mask": (ok, "t2v", {"loss": {"kind": "region"}}, "missing tensor 'mask'"),
        "i2v pair, t2v model": (random_pair(i2v_model, 2, 4, 4, g), "t2v", {}, "wrong kind?"),
        "t2v pair, i2v model": (ok, "i2v", {}, "missing tensor 'cond'"),
        "integer latents": ({**ok, "win": torch.zeros(16, 2, 4, 4, dtype=torch.int32)}, "t2v", {},
                            "win has dtype I32"),
    }


@pytest.mark.parametrize("case", ["missing file", "text dim", "channels", "patch", "lose shape",
                                  "region without mask", "i2v pair, t2v model",
                                  "t2v pair, i2v model", "integer latents"])
def test_bad_pairs_fail_before_any_step_naming_the_pair(tiny, store, case) -> None:
    models = {kind: transformer_config(WanSpec(kind, tiny[kind])) for kind in ("t2v", "i2v")}
    g = torch.Generator().manual_seed(1)
    if case == "missing file":
        bad, kind, extra, message = random_pair(models["t2v"], 2, 4, 4, g), "t2v", {}, "missing"
    else:
        bad, kind, extra, message = _bad_pairs(models["t2v"], models["i2v"])[case]
    good = random_pair(models[kind], 2, 4, 4, g)
    if kind == "t2v" and extra.get("loss", {}).get("kind") == "region":
        good["mask"] = torch.ones(1, 2, 4, 4)
    write_pairs(store, "data/pairs", {"pair-0": good, "pair-1": bad})
    if case == "missing file":
        store.delete("data/pairs/pairs/pair-1.safetensors")

    with pytest.raises(PairDataError) as err:
        Trainer(config(tiny, kind, **extra), store, "runs/t/train")
    assert "'pair-1'" in str(err.value) and message in str(err.value)
    assert "'pair-0'" not in str(err.value)
    assert not store.exists("runs/t/train/metrics.jsonl")


@pytest.mark.parametrize("over, path", [
    ({"loss": {"beta": 0}}, "loss"), ({"loss": {"beta": -500}}, "loss"),
    ({"lora": {"rank": 0}}, "lora.rank"), ({"optimizer": {"lr": 0}}, "optimizer.lr"),
    ({"optimizer": {"lr": -5e-6}}, "optimizer.lr"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "betas"),
    ({"grad_accum": 0}, "grad_accum"), ({"dtype": "bf16"}, "dtype\n.*'bfloat16'"),
    ({"kind": "i2v-2.2"}, "not trainable yet"),
])
def test_out_of_range_config_fails_validation(tiny, over, path) -> None:
    """β ≤ 0, rank 0, lr ≤ 0 and friends: rejected by the config, before any Trainer exists."""
    with pytest.raises(ValidationError, match=path):
        config(tiny, **over)


# ---------------------------------------------------------------------------------------
# Checkpoints: another config refuses to resume; SIGKILL + resume = the same curve
# ---------------------------------------------------------------------------------------


def test_resume_under_another_config_fails_before_any_step(tiny, store) -> None:
    pairs(store, tiny)
    out = "runs/t/train"
    train(config(tiny, steps=1, checkpoint=dict(every=1)), store, out)
    log = store.read_bytes(f"{out}/metrics.jsonl")

    with pytest.raises(ConfigMismatchError, match=r"optimizer\.lr: 0\.001 -> 0\.002"):
        Trainer(config(tiny, steps=1, optimizer=dict(lr=2e-3)), store, out)
    assert store.read_bytes(f"{out}/metrics.jsonl") == log
    # Checkpoint cadence changes no number: resuming with another one is allowed.
    Trainer(config(tiny, steps=1, checkpoint=dict(every=7)), store, out)


_DRIVER = textwrap.dedent("""
    import sys, threading
    import tasks.train as t

    hang_at = int(sys.argv[1])
    step = t.Trainer.train_step

    def train_step(self):
        if self.step == hang_at:  # mid-run, past a checkpoint: wait here for SIGKILL
            threading.Event().wait()
        return step(self)

    t.Trainer.train_step = train_step
    t.main(sys.argv[2:])
""")


def _run_until_killed(tmp_path: Path, cfg: TrainConfig, store: Store, out: str, hang_at: int,
                      checkpoint_step: int) -> int:
    """Train in a subprocess; SIGKILL it once the checkpoint of `checkpoint_step` is visible and
    the steps after it up to `hang_at` are logged. Returns the process's exit status."""
    (tmp_path / "driver.py").write_text(_DRIVER)
    (tmp_path / "train.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(hang_at), str(tmp_path / "train.json"),
           "--store", store.url, "--out", out]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        for _ in range(2400):  # up to 120 s of 50 ms polls of the store
            if proc.poll() is not None:
                pytest.fail(f"trainer exited ({proc.returncode}) before it was killed:\n"
                            + stderr.read_text()[-3000:])
            latest = (store.read_json(f"{out}/checkpoints/latest.json")
                      if store.exists(f"{out}/checkpoints/latest.json") else {})
            logged = len(metrics_log(store, out)) if store.exists(f"{out}/metrics.jsonl") else 0
            if latest.get("step") == checkpoint_step and logged == hang_at:
                break
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        else:
            pytest.fail("the step-%d checkpoint never appeared:\n%s"
                        % (checkpoint_step, stderr.read_text()[-3000:]))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode


def test_resume_after_sigkill_gives_the_same_loss_curve(tiny, store, tmp_path) -> None:
    pairs(store, tiny, n=3)  # 3 pairs, 6 steps: the resume crosses an epoch boundary
    cfg = config(tiny, steps=6, checkpoint=dict(every=2), lora=dict(dropout=0.1))
    train(cfg, store, "runs/whole")

    # log_sync_s=0: the killed run uploads its log every step, so lines past the checkpoint
    # reach the store and the resume must drop them (run control: not in the config digest).
    killed_cfg = cfg.model_copy(update={"log_sync_s": 0.0})
    status = _run_until_killed(tmp_path, killed_cfg, store, "runs/killed", hang_at=3, checkpoint_step=2)
    assert status == -signal.SIGKILL
    assert [line["step"] for line in metrics_log(store, "runs/killed")] == [1, 2, 3]
    train(cfg, store, "runs/killed")  # resumes from step 2; step 3's line is redone

    whole, resumed = metrics_log(store, "runs/whole"), metrics_log(store, "runs/killed")
    assert [line["step"] for line in resumed] == [1, 2, 3, 4, 5, 6]
    drop = lambda line: {k: v for k, v in line.items() if k not in UNTIMED}  # noqa: E731
    assert [drop(line) for line in resumed] == [drop(line) for line in whole]
    adapter = "adapter/pytorch_lora_weights.safetensors"
    a = load_file(store.local_path(f"runs/whole/{adapter}"))
    b = load_file(store.local_path(f"runs/killed/{adapter}"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# The collapse guard
# ---------------------------------------------------------------------------------------


def _feed(guard: CollapseGuard, dgr: list[float], win: list[float],
          lose: list[float]) -> list[bool]:
    return [guard.update({"dgr": d, "win_gap": w, "lose_gap": ll})
            for d, w, ll in zip(dgr, win, lose)]


def test_collapse_guard_fires_on_the_papers_signature_only() -> None:
    falling_dgr = [125, 100, 60, 20, 8, 5]
    rising = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    # DPO's collapse (Fig. 2): DGR → 0 while both gaps rise.
    assert _feed(CollapseGuard(4, 0.1), falling_dgr, rising, rising) == [False] * 5 + [True]
    # Reg-DPO's healthy run: DGR falls, but win_gap goes down.
    falling = [-x for x in rising]
    assert not any(_feed(CollapseGuard(4, 0.1), falling_dgr, falling, rising))
    # Both gaps rise while DGR stays high: not (yet) the signature.
    assert not any(_feed(CollapseGuard(4, 0.1), [125] * 6, rising, rising))
    # Non-finite and missing values (skipped steps, KTO) are ignored.
    nan = {"dgr": float("nan"), "win_gap": 0, "lose_gap": 0}
    assert CollapseGuard(2, 0.1).update(nan) is False
    assert CollapseGuard(2, 0.1).update({"loss": 1.0}) is False
