"""DPO vs Reg-DPO on synthetic preference pairs: does DPO collapse and Reg-DPO not? (paper Fig. 2)

Not a test: an experiment that prints what it sees and writes the Fig. 2 panels.

    PYTHONPATH=. python experiments/dpo_vs_regdpo.py --steps 300 --out artifacts/experiments/dpo_vs_regdpo

Model: a random-weight Wan2.1 T2V transformer (the tiny build's layout, made wider and deeper:
`--layers`, 4 heads of 12) with a rank-8 LoRA. Data: win latents are smooth space-time waves
(a few low-frequency sinusoids per pair, a structured distribution a model can learn); the
lose latent of a pair is its win latent plus white noise, so there is a real preference
(smooth over noisy) and win and lose are close, as in GT-Pair. Before any preference training
the base is fitted to both sides with full-weight flow matching (`--pretrain-steps`): the paper's
base model already fits its data, and a random-weight reference is not a fair stand-in —
against one, any training lowers both errors and no collapse can show. Both runs share seed,
data, LoRA init and (t, ε) per pair; only train.loss differs: DPO (Eq. 2) vs Reg-DPO with
r = DGR (Eq. 6), β = 500 in both. About 1-2 min on 2 CPU cores at the defaults.

The paper predicts (§3.2, Fig. 2): under DPO the DGR falls toward 0 while win_gap and lose_gap
both rise (the policy gets worse at the winners too); Reg-DPO keeps win_gap ≤ 0.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from infra.plots import compare_panels, fig2_panels
from infra.store import Store
from models.tiny import build_tiny, tiny_transformer_config
from models.wan import TEXT_LEN, WanSpec, load_transformer, training_scheduler
from infra.pairs_format import PAIRS_FORMAT, PairsDataset, pair_bytes
from tasks.train import TrainConfig, train, transformer_config

LOSSES = {"DPO": {"kind": "dpo"}, "Reg-DPO": {"kind": "regdpo", "r": "dgr"}}


def build_model(path: Path, layers: int, seed: int) -> str:
    """The tiny T2V pipeline folder with a wider, deeper random transformer in it."""
    build_tiny("t2v", path, seed=seed)
    config = tiny_transformer_config("t2v") | dict(num_attention_heads=4, num_layers=layers,
                                                   ffn_dim=192)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        WanTransformer3DModel(**config).save_pretrained(str(path / "transformer"))
    return str(path)


def smooth_latent(shape: tuple[int, ...], g: torch.Generator, waves: int = 3) -> torch.Tensor:
    """A sum of random low-frequency space-time sinusoids per channel, unit variance overall."""
    c, f, h, w = shape
    tt, yy, xx = torch.meshgrid(torch.linspace(0, 1, f), torch.linspace(0, 1, h),
                                torch.linspace(0, 1, w), indexing="ij")
    out = torch.zeros(shape)
    for _ in range(waves):
        kt, ky, kx = (torch.randint(0, 3, (3,), generator=g) * math.pi).tolist()
        phase = torch.rand(c, 1, 1, 1, generator=g) * 2 * math.pi
        amp = torch.randn(c, 1, 1, 1, generator=g)
        out += amp * torch.cos(kt * tt + ky * yy + kx * xx + phase)
    return out / out.std().clamp_min(1e-6)


def write_pairs(store: Store, stage_dir: str, pairs: dict[str, dict[str, torch.Tensor]]) -> str:
    """Pair files in the regdpo.pairs.v1 format, then the committed manifest (last)."""
    rows = []
    for pair_id, tensors in pairs.items():
        uri = store.write_bytes(f"{stage_dir}/pairs/{pair_id}.safetensors", pair_bytes(tensors))
        rows.append({"id": pair_id, "status": "ok", "reason": "", "latents": uri})
    store.commit_manifest(stage_dir, rows, {"format": PAIRS_FORMAT, "pairs": len(rows)})
    return stage_dir


def write_synthetic_pairs(store: Store, key: str, model: dict, n: int, frames: int, side: int,
                          noise: float, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    shape = (model["out_channels"], frames, side, side)
    pairs = {}
    for i in range(n):
        win = smooth_latent(shape, g)
        pairs[f"pair-{i:04d}"] = {
            "win": win, "lose": win + noise * torch.randn(shape, generator=g),
            "prompt_embeds": torch.randn(TEXT_LEN, model["text_dim"], generator=g)}
    return write_pairs(store, key, pairs)


def pretrain(model: str, store: Store, key: str, steps: int, lr: float, seed: int) -> None:
    """Full-weight flow-matching training of the base on both sides of every pair, so the
    reference is a model that already fits the data (as a real base model fits its own
    generations, the GT-Pair losers) rather than random weights any training improves."""
    spec = WanSpec("t2v", model, "float32")
    net, sigmas = load_transformer(spec), training_scheduler(spec).sigmas.float()
    data = PairsDataset.open(store, key)
    pairs = [data.load(i) for i in range(len(data))]
    latents = torch.stack([p[side] for p in pairs for side in ("win", "lose")])
    prompts = torch.stack([p["prompt_embeds"] for p in pairs for _ in range(2)])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(latents), (8,), generator=g)
        i = torch.randint(len(sigmas) - 1, (8,), generator=g)  # the last sigma is 0
        z, eps = latents[idx], torch.randn(latents[idx].shape, generator=g)
        sigma = sigmas[i].view(-1, 1, 1, 1, 1)
        pred = net(hidden_states=(1 - sigma) * z + sigma * eps, timestep=sigmas[i] * 1000,
                   encoder_hidden_states=prompts[idx], return_dict=False)[0]
        loss = ((pred - (eps - z)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: flow-matching loss {loss.item():.4f}")
    net.save_pretrained(str(Path(model) / "transformer"))


def summary(label: str, rows: list[dict]) -> str:
    first, last = rows[0], rows[-1]
    tail = rows[-max(1, len(rows) // 10):]  # the last 10% of steps, averaged: less noise

    def mean(k: str) -> float:
        return sum(r[k] for r in tail) / len(tail)

    return (f"{label:8s} DGR {first['dgr']:8.3f} -> {last['dgr']:8.3f} (last-10% mean "
            f"{mean('dgr'):8.3f}) | win_gap {first['win_gap']:+.2e} -> {last['win_gap']:+.2e} "
            f"(mean {mean('win_gap'):+.2e}) | lose_gap {first['lose_gap']:+.2e} -> "
            f"{last['lose_gap']:+.2e} (mean {mean('lose_gap'):+.2e}) | implicit_acc "
            f"{mean('implicit_acc'):.2f} | collapse warnings {sum(bool(r.get('collapse')) for r in rows)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="artifacts/experiments/dpo_vs_regdpo")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--frames", type=int, default=2, help="latent frames")
    p.add_argument("--side", type=int, default=8, help="latent height = width")
    p.add_argument("--noise", type=float, default=0.5, help="std of the lose perturbation")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--beta", type=float, default=500.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--pretrain-steps", type=int, default=400,
                   help="full-weight steps that fit the base to the data before preference "
                   "training (0 = the reference keeps its random weights)")
    p.add_argument("--only", choices=list(LOSSES), help="train this run only (e.g. to redo one)")
    p.add_argument("--plot-only", action="store_true",
                   help="re-plot and summarise the metrics already under --out; train nothing")
    args = p.parse_args()

    out = Path(args.out).resolve()
    store = Store(f"file://{out}/store")
    if not args.plot_only:
        train_runs(store, out, args)
    runs = {label: read_metrics(store, f"runs/{label.lower()}/metrics.jsonl")
            for label in LOSSES if store.exists(f"runs/{label.lower()}/metrics.jsonl")}
    report(runs, out, args)


def train_runs(store: Store, out: Path, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, ready = str(out / "model"), out / "model" / "ready.json"
    if not ready.exists():  # model, data (and pretraining) are made once per --out
        build_model(out / "model", args.layers, args.seed)
        write_synthetic_pairs(store, "data/pairs", transformer_config(WanSpec("t2v", model)),
                              args.pairs, args.frames, args.side, args.noise, args.seed)
        if args.pretrain_steps:
            pretrain(model, store, "data/pairs", args.pretrain_steps, 1e-3, args.seed)
        ready.write_text(json.dumps(vars(args)))
    for label, loss in LOSSES.items():
        if args.only and label != args.only:
            continue
        cfg = TrainConfig.model_validate(dict(
            model=model, kind="t2v", dtype="float32", data="data/pairs", steps=args.steps,
            batch_size=args.batch_size, seed=args.seed, loss=loss | {"beta": args.beta},
            lora=dict(rank=8, alpha=16), optimizer=dict(lr=args.lr, weight_decay=0.0),
            checkpoint=dict(every=args.steps, resume=False)))
        start = time.perf_counter()
        result = train(cfg, store, f"runs/{label.lower()}")
        print(f"{label}: {result['steps']} steps in {time.perf_counter() - start:.0f} s")


def read_metrics(store: Store, key: str) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(key).decode().splitlines()]


def report(runs: dict[str, list[dict]], out: Path, args: argparse.Namespace) -> None:
    for label, rows in runs.items():
        print(fig2_panels(rows, out / f"{label.lower()}_fig2.png", f"{label}, β={args.beta}"))
    steps = len(next(iter(runs.values())))
    print(compare_panels(runs, out / "dpo_vs_regdpo_fig2.png",
                         f"DPO vs Reg-DPO (r = DGR), β={args.beta}, {steps} steps"))
    for label, rows in runs.items():
        print(summary(label, rows))


if __name__ == "__main__":
    main()
