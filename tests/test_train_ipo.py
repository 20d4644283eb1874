"""The trainer's Dual-IPO side (issue 14, step 4): KTO on pointwise rows, the NLL term on real
clips and/or the winners, a policy that starts from a previous round's adapter, and a
reference that is the base or that previous policy. Tiny random-weight Wan T2V, random
latents (F=2, H=W=4), one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file

from infra.checkpoint import ConfigMismatchError, save_final_adapter
from infra.config import TrainConfig
from infra.config.base import ConfigError
from infra.pairs_format import PairsDataset
from infra.store import Store
from models.tiny import build_tiny
from models.wan import WanSpec, lora_parameters, reference_mode, transformer_config
from pairs_data import random_pair, random_video, write_pairs, write_rows
from tasks.train import PairBatch, Trainer, VideoBatch, config_digest, train

DATA = "data/rows"
ADAPTER = "runs/round1/train/adapter"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny("t2v", tmp_path_factory.mktemp("wan") / "t2v")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def config(tiny: str, **over: Any) -> TrainConfig:
    """float32 on the CPU (no bf16 autocast under the hand computations), rank-4 LoRA, no
    shuffle; β = 4 keeps the sigmoids away from saturation so every term carries gradient."""
    base: dict[str, Any] = dict(model=tiny, kind="t2v", dtype="float32", data=DATA, steps=2,
                                device="cpu",
                                batch_size=2, shuffle=False, lora=dict(rank=4, alpha=8),
                                optimizer=dict(lr=1e-3, weight_decay=0.0),
                                checkpoint=dict(every=100))
    for key, value in over.items():
        base[key] = base[key] | value if isinstance(value, dict) and key in base else value
    return TrainConfig.model_validate(base)


def rows(store: Store, tiny: str, pairs: int = 2, pointwise: int = 4, real: int = 2) -> None:
    """A dataset of every kind: pointwise labels alternate desirable / undesirable."""
    model = transformer_config(WanSpec("t2v", tiny))
    g = torch.Generator().manual_seed(0)
    videos = {f"pw-{i}": ("pointwise", i % 2 == 0, random_video(model, 2, 4, 4, g))
              for i in range(pointwise)}
    videos |= {f"real-{i}": ("real", None, random_video(model, 2, 4, 4, g)) for i in range(real)}
    write_rows(store, DATA, {f"pair-{i}": random_pair(model, 2, 4, 4, g) for i in range(pairs)},
               videos)


def perturb_lora(trainer: Trainer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(trainer.transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_grads(trainer: Trainer) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in lora_parameters(trainer.transformer)]
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def assert_same_gradient(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    g, w = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    assert w.norm() > 0 and (g - w).norm() <= 1e-5 * w.norm(), ((g - w).norm(), w.norm())


# ---------------------------------------------------------------------------------------
# The hand computation: the transformer called directly, the paper's formulas in autograd
# ---------------------------------------------------------------------------------------


def hand_errors(model: torch.nn.Module, latent: torch.Tensor, batch: Any) -> torch.Tensor:
    """e = mean over the latent of (ε − z − v(x_t, t, c))², x_t = (1 − σ)z + σε, per sample."""
    sigma = batch.sigma.view(-1, 1, 1, 1, 1)
    x_t, target = (1 - sigma) * latent + sigma * batch.noise, batch.noise - latent
    pred = model(hidden_states=x_t, timestep=batch.timestep,
                 encoder_hidden_states=batch.prompt_embeds, return_dict=False)[0]
    return ((target - pred) ** 2).flatten(1).mean(1)


def both(model: torch.nn.Module, latent: torch.Tensor, batch: Any) -> tuple[torch.Tensor, ...]:
    with torch.no_grad(), reference_mode(model):
        ref = hand_errors(model, latent, batch)
    return hand_errors(model, latent, batch), ref


def kto_by_hand(err: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float,
                w_d: float, w_u: float) -> torch.Tensor:
    """Diffusion-KTO: ρ = −(β/2)(e_θ − e_ref), z = max(0, mean ρ) detached,
    desirable λ_D(1 − σ(ρ − z)), undesirable λ_U(1 − σ(z − ρ)), mean over the batch."""
    rho = -(beta / 2) * (err - ref)
    z = rho.detach().mean().clamp(min=0)
    per = torch.where(desirable, w_d * (1 - torch.sigmoid(rho - z)),
                      w_u * (1 - torch.sigmoid(z - rho)))
    return per.mean()


def test_kto_on_pointwise_rows_with_nll_on_real_and_winners_is_the_formula(tiny, store) -> None:
    """L = KTO(pointwise) + λ·mean e_θ(real) + λ·mean e_θ(desirable): the trainer's loss, its
    NLL metrics and its LoRA gradients equal the formula in autograd on the same errors."""
    rows(store, tiny)
    lam, beta = 0.3, 4.0
    cfg = config(tiny, loss=dict(kind="kto", kto_on="pointwise", beta=beta, nll_lambda=lam,
                                 nll_on="both", kto_undesirable_weight=1.5))
    trainer = Trainer(cfg, store, "runs/kto")
    perturb_lora(trainer)
    batch = trainer.next_batch()
    assert isinstance(batch, VideoBatch) and batch.real is not None
    assert batch.desirable.tolist() == [True, False]  # rows pw-0, pw-1 in order

    metrics = trainer.forward_backward_step(batch, 1.0)
    got = lora_grads(trainer)

    model = trainer.transformer
    err, ref = both(model, batch.latent, batch)
    err_real = hand_errors(model, batch.real.latent, batch.real)
    kto = kto_by_hand(err, ref, batch.desirable, beta, 1.0, 1.5)
    nll_real, nll_win = lam * err_real.mean(), lam * err[batch.desirable].mean()
    want_loss = kto + nll_real + nll_win
    want_loss.backward()
    want = lora_grads(trainer)

    assert metrics["kto_loss"] == pytest.approx(kto.item(), rel=1e-5)
    assert metrics["nll_real"] == pytest.approx(nll_real.item(), rel=1e-5)
    assert metrics["nll_winners"] == pytest.approx(nll_win.item(), rel=1e-5)
    assert metrics["nll_term"] == pytest.approx((nll_real + nll_win).item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(want_loss.item(), rel=1e-5)
    assert nll_real.item() > 1e-3 and nll_win.item() > 1e-3  # the terms are not negligible
    assert_same_gradient(got, want)


@pytest.mark.parametrize("kind, nll_on", [("dpo", "real"), ("regdpo", "both")])
def test_pair_losses_with_nll_are_the_formula(tiny, store, kind, nll_on) -> None:
    """DPO (Eq. 2) / Reg-DPO (Eq. 6) on the pairs + λ·mean e_θ on the real clips drawn with the
    micro-batch (+ λ·mean e_θ^w for nll_on both)."""
    rows(store, tiny)
    lam, beta = 0.5, 4.0
    cfg = config(tiny, loss=dict(kind=kind, beta=beta, nll_lambda=lam, nll_on=nll_on))
    trainer = Trainer(cfg, store, "runs/dpo")
    perturb_lora(trainer)
    batch = trainer.next_batch()
    assert isinstance(batch, PairBatch) and batch.real.size == 2

    metrics = trainer.forward_backward_step(batch, 1.0)
    got = lora_grads(trainer)

    model = trainer.transformer
    (err_w, ref_w), (err_l, ref_l) = both(model, batch.win, batch), both(model, batch.lose, batch)
    err_real = hand_errors(model, batch.real.latent, batch.real)
    b = beta / 2
    s = (err_w - ref_w) - (err_l - ref_l)
    preference = -F.logsigmoid(-b * s)
    if kind == "regdpo":
        preference = preference + (b * torch.sigmoid(b * s)).detach() * err_w  # r = DGR, k = 1
    want_loss = preference.mean() + lam * err_real.mean()
    if nll_on == "both":
        want_loss = want_loss + lam * err_w.mean()
    want_loss.backward()

    assert metrics["err_real"] == pytest.approx(err_real.mean().item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(want_loss.item(), rel=1e-5)
    assert ("nll_winners" in metrics) == (nll_on == "both")
    assert_same_gradient(got, lora_grads(trainer))


def test_kto_on_pairs_makes_winners_desirable_and_trains(tiny, store) -> None:
    """kto_on: pairs keeps the winners-desirable / losers-undesirable reading; two steps of
    KTO + NLL on the winners move every LoRA weight."""
    rows(store, tiny, pointwise=0, real=0)
    cfg = config(tiny, loss=dict(kind="kto", kto_on="pairs", nll_lambda=0.1, nll_on="winners"))
    trainer = Trainer(cfg, store, "runs/kto-pairs")
    before = [p.detach().clone() for p in lora_parameters(trainer.transformer)]
    result = trainer.train()
    assert result["steps"] == 2 and result["skipped"] == 0
    after = lora_parameters(trainer.transformer)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------
# Rounds: the policy starts from the previous adapter; the reference is base or that policy
# ---------------------------------------------------------------------------------------


def previous_round(store: Store, tiny: str) -> dict[str, torch.Tensor]:
    """A 'round 1' adapter in the store (random LoRA weights, saved as the train stage saves
    its adapter); returns its tensors as the file holds them."""
    trainer = Trainer(config(tiny), store, "runs/round1/train")
    perturb_lora(trainer, seed=7)
    save_final_adapter(store, trainer.transformer, ADAPTER)
    return load_file(store.local_path(f"{ADAPTER}/pytorch_lora_weights.safetensors"))


def adapter_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {f"transformer.{k}": v for k, v in
            get_peft_model_state_dict(trainer.transformer, adapter_name="default").items()}


@pytest.mark.parametrize("reference", ["previous", "base"])
def test_a_round_starts_from_the_previous_adapter(tiny, store, reference) -> None:
    """Step 0's LoRA is the saved adapter, bit for bit. With reference: previous the reference
    is that same policy, so every gap is 0 at step 0 (pairs and pointwise alike); with base the
    gaps are the previous round's drift, not 0."""
    rows(store, tiny)
    saved = previous_round(store, tiny)
    for loss in (dict(kind="regdpo"), dict(kind="kto", kto_on="pointwise")):
        cfg = config(tiny, init_adapter=ADAPTER, reference=reference, loss=loss)
        trainer = Trainer(cfg, store, f"runs/round2-{loss['kind']}-{reference}")
        start = adapter_tensors(trainer)
        assert start.keys() == saved.keys()
        assert all(torch.equal(start[k], saved[k]) for k in saved)

        metrics = trainer.forward_backward_step(trainer.next_batch(), 1.0)
        gaps = ([metrics["win_gap"], metrics["lose_gap"], metrics["s"]] if loss["kind"] == "regdpo"
                else [metrics["reward"], metrics["kl"]])
        if reference == "previous":
            assert gaps == [0.0] * len(gaps), metrics
            assert metrics.get("dgr", 1.0) == pytest.approx(cfg.loss.beta / 4 if "dgr" in metrics
                                                            else 1.0)
        else:
            assert any(abs(g) > 1e-6 for g in gaps), metrics


def test_reference_previous_trains_only_the_policy_and_saves_only_it(tiny, store) -> None:
    """The frozen reference adapter never moves and is not in the saved adapter, which loads
    back as the policy; the optimizer holds the policy's LoRA only."""
    rows(store, tiny)
    saved = previous_round(store, tiny)
    cfg = config(tiny, init_adapter=f"{ADAPTER}/pytorch_lora_weights.safetensors",
                 loss=dict(kind="kto"))
    trainer = Trainer(cfg, store, "runs/round2")
    reference = [p.detach().clone() for p in lora_parameters(trainer.transformer, "reference")]
    assert len(reference) == len(lora_parameters(trainer.transformer)) > 0
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in lora_parameters(trainer.transformer)}

    trainer.train()

    after = lora_parameters(trainer.transformer, "reference")
    assert all(torch.equal(a, b) for a, b in zip(reference, after))
    out = load_file(store.local_path("runs/round2/adapter/pytorch_lora_weights.safetensors"))
    assert out.keys() == saved.keys()
    assert any(not torch.equal(out[k], saved[k]) for k in saved)  # the policy trained
    final = adapter_tensors(trainer)
    assert all(torch.equal(out[k], final[k]) for k in out)


def test_the_adapter_and_the_reference_enter_the_key(tiny, store) -> None:
    """config_digest (the stage key's settings and the resume check) changes with the start
    adapter's bytes and with the reference; a resume under another start adapter fails."""
    cfg = config(tiny, init_adapter=ADAPTER)
    digests = {config_digest(cfg, "data", "sha-a")[0], config_digest(cfg, "data", "sha-b")[0],
               config_digest(cfg.model_copy(update={"reference": "base"}), "data", "sha-a")[0],
               config_digest(cfg.model_copy(update={"init_adapter": None}), "data")[0]}
    assert len(digests) == 4

    rows(store, tiny)
    previous_round(store, tiny)
    train(config(tiny, init_adapter=ADAPTER, steps=1, checkpoint=dict(every=1)), store, "runs/r2")
    with torch.no_grad():  # another round-1 adapter at the same key: other bytes, other run
        trainer = Trainer(config(tiny), store, "runs/round1/train")
        perturb_lora(trainer, seed=8)
        save_final_adapter(store, trainer.transformer, ADAPTER)
    with pytest.raises(ConfigMismatchError, match="init_adapter_sha256"):
        Trainer(config(tiny, init_adapter=ADAPTER, steps=1), store, "runs/r2")


# ---------------------------------------------------------------------------------------
# Refusals, with the key and the fix
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, loss, message", [
    (dict(pointwise=0, real=0), dict(kind="kto"),
     r"train.loss.kind: kto, kto_on: pointwise needs rows of kind 'pointwise'.*kto_on: pairs"),
    (dict(pairs=0, pointwise=0), dict(kind="kto", kto_on="pairs"),
     r"has 2 real: .*needs rows of kind 'pair'; add pairs"),
    (dict(pairs=0, pointwise=0), dict(kind="kto"),
     r"has 2 real: .*kind 'pointwise'"),
    (dict(real=0), dict(kind="dpo", nll_lambda=0.1),
     r"nll_on: real needs rows of kind 'real'.*nll_on: winners"),
    (dict(pairs=0), dict(kind="regdpo"), r"kind 'pair'.*kto_on: pointwise"),
])
def test_data_the_config_cannot_train_on_is_refused_before_any_step(tiny, store, data, loss,
                                                                    message) -> None:
    rows(store, tiny, **data)
    with pytest.raises(ConfigError, match=message) as err:
        Trainer(config(tiny, loss=loss), store, "runs/t")
    assert "train.data" in str(err.value) and store.uri(DATA) in str(err.value)
    assert not store.exists("runs/t/metrics.jsonl")


@pytest.mark.parametrize("over, message", [
    (dict(loss=dict(kind="kto"), parallel=dict(pair_parallel=True)),
     r"pair_parallel.*\(pointwise\).*pair_parallel: false"),
    (dict(loss=dict(nll_lambda=0.1), parallel=dict(pair_parallel=True)),
     r"pair_parallel.*\(real\)"),
    (dict(reference="policy"), r"reference"),
    (dict(loss=dict(nll_on="gt")), r"nll_on"),
])
def test_inconsistent_configs_fail_validation(tiny, over, message) -> None:
    with pytest.raises(ValidationError, match=message):
        config(tiny, **over)


def test_the_nll_and_a_reference_need_no_new_keys(tiny) -> None:
    """λ > 0 is a config now (the old refusal is gone); winners-only NLL needs no real clips;
    reference: previous without a start adapter is the base (round 1)."""
    cfg = config(tiny, loss=dict(kind="dpo", nll_lambda=0.1, nll_on="winners"))
    assert cfg.row_kinds() == {"pair": "train.loss.kind: dpo"} and cfg.reference == "previous"


def test_a_bad_start_adapter_fails_before_any_step(tiny, store) -> None:
    rows(store, tiny)
    with pytest.raises(FileNotFoundError, match=r"train.init_adapter: no adapter at .*runs/none"):
        Trainer(config(tiny, init_adapter="runs/none/adapter"), store, "runs/t")
    previous_round(store, tiny)  # rank 4
    with pytest.raises(ValueError, match=r"train.init_adapter .*does not fit.*rank/targets"):
        Trainer(config(tiny, init_adapter=ADAPTER, lora=dict(rank=2, alpha=4)), store, "runs/t")


def test_old_pairs_datasets_read_as_pairs(tiny, store) -> None:
    """A manifest without the `kind` column (every dataset before Dual-IPO) is all pairs."""
    model = transformer_config(WanSpec("t2v", tiny))
    g = torch.Generator().manual_seed(0)
    write_pairs(store, DATA, {"p0": random_pair(model, 2, 4, 4, g)})
    found = PairsDataset.open_kinds(store, DATA)
    assert list(found) == ["pair"] and found["pair"].ids == ["p0"]


# ---------------------------------------------------------------------------------------
# The writer and the reader of the format: precompute's single videos train
# ---------------------------------------------------------------------------------------


def test_precomputed_pointwise_and_real_videos_train_kto_with_nll(tiny, tmp_path) -> None:
    """precompute_item on rows of kind pointwise and real (GT clips at the GT spec) writes
    regdpo.video.v1 files; committed, the trainer opens them and a KTO + NLL step trains."""
    from gt_clips import commit_gt_run
    from infra.config import PrecomputeConfig
    from models.runtime import encode_prompts
    from tasks.precompute import precompute_item

    url = f"file://{tmp_path}/store"
    st = Store(url)
    clips = commit_gt_run(url, "ipo", n=3, frames=9, short_edge=32)
    cfg = PrecomputeConfig(model=tiny, kind="t2v", dtype="float32", short_edge=32)
    texts = encode_prompts(st, WanSpec("t2v", tiny, "float32"), [c["prompt"] for c in clips], None)
    model = {k: v for k, v in transformer_config(WanSpec("t2v", tiny)).items()
             if k in ("in_channels", "out_channels", "text_dim", "image_dim", "patch_size")}
    labels = [("pointwise", True), ("pointwise", False), ("real", None)]
    rows = []
    for clip, (kind, desirable) in zip(clips, labels):
        row = clip | {"kind": kind, "desirable": desirable}
        rows.append(precompute_item(st, f"items/precompute/{clip['id']}", {
            "id": clip["id"], "row": row, "config": cfg.model_dump(),
            "text_key": texts[clip["prompt"]], "model_config": model}))
    assert [r["kind"] for r in rows] == ["pointwise", "pointwise", "real"]
    assert [r["format"] for r in rows] == ["regdpo.video.v1"] * 3
    st.commit_manifest(DATA, rows, {"stage": "precompute"})

    found = PairsDataset.open_kinds(st, DATA)
    assert {k: len(d) for k, d in found.items()} == {"pointwise": 2, "real": 1}
    assert found["pointwise"].desirable == (True, False)
    train_cfg = config(tiny, steps=1, batch_size=1,
                       loss=dict(kind="kto", nll_lambda=0.5, nll_on="both"))
    result = Trainer(train_cfg, st, "runs/ipo/train").train()
    log = st.read_bytes("runs/ipo/train/metrics.jsonl").decode()
    assert result["skipped"] == 0 and '"nll_real"' in log and '"kto_loss"' in log


def test_a_resume_continues_the_real_clips_where_they_were(tiny, store) -> None:
    """The real clips' cursor is checkpointed with the main one: stopping after step 1 and
    resuming gives step 2 the numbers of a run that never stopped (shuffled, 3 real clips in
    batches of 2, so step 2 starts a new epoch of them)."""
    rows(store, tiny, real=3)
    cfg = config(tiny, shuffle=True, loss=dict(kind="kto", nll_lambda=0.5, nll_on="real"))
    train(cfg, store, "runs/whole")

    first = Trainer(cfg, store, "runs/stopped")
    first.resume()
    first.train_step()
    first.step = 1
    first.save_checkpoint()
    Trainer(cfg, store, "runs/stopped").train()

    def step2(out: str) -> dict:
        import json

        lines = [json.loads(x) for x in store.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
        line = next(x for x in lines if x["step"] == 2)
        return {k: v for k, v in line.items() if k not in ("step_time", "peak_mem")}

    assert step2("runs/stopped") == step2("runs/whole")
    assert step2("runs/whole")["err_real"] > 0
