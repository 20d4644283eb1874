"""DPO vs Reg-DPO on synthetic preference pairs: the paper's Fig. 2 in miniature.

Not a test: an experiment that prints what it sees and writes the Fig. 2 panels of both runs.

    PYTHONPATH=. python experiments/dpo_vs_regdpo.py --quick            # seed 0: 1-2 min, 1 thread
    PYTHONPATH=. python experiments/dpo_vs_regdpo.py                    # seeds 0 1 2: 3× that

Per seed it prints one line per method, computed from the run's own `metrics.jsonl`:

    DPO: DGR 500.0 -> 29.9, win_gap +5.7e-03, lose_gap +2.5e-02, guard fired yes

`<start>` is the first step's DGR (= β/4: s = 0 while the LoRA is the identity); `<end>`, win_gap
and lose_gap are means over the last `--collapse-window`/2 steps (the collapse guard's late half;
one step's values are noisy, one t per pair). "guard fired" is the trainer's own CollapseGuard
(tasks/train.py, the `collapse` column of the log) at any step. A run shows the paper's collapse
when the end DGR is below `--collapse-fraction` (10%) of the start, both gaps are above 0 (the
policy fits winners and losers worse than the reference) and the guard fired. The panels go to
`<out>/seed<N>/{dpo,reg-dpo}_fig2.png` and both overlaid in `dpo_vs_regdpo_fig2.png`.

Model: a random-weight Wan2.1 T2V transformer (the tiny build's layout, made wider and deeper:
`--layers`, 4 heads of 12) with a rank-8 LoRA. Data: win latents are smooth space-time waves
(a few low-frequency sinusoids per pair, a structured distribution a model can learn); the
lose latent of a pair is its win latent plus white noise (`--noise`), so there is a real
preference (smooth over noisy) and win and lose overlap, as in GT-Pair. Before any preference
training the base is fitted to both sides with full-weight flow matching (`--pretrain-steps`):
the paper's base model already fits its data, and against a random-weight reference any
training lowers both errors and no collapse can show. Both runs share seed, data, LoRA init and
(t, ε) per pair; only train.loss differs: DPO (Eq. 2) vs Reg-DPO with r = DGR (Eq. 6).

The setting (the defaults), and why it differs from the paper's β = 500, lr 5e-6:
- β = 2000 (DGR starts at 500), AdamW lr 2e-3, 200 steps of batch 4. At β = 500, lr 1e-3 and
  Wan's shift, DPO's gaps both rise but DGR only falls 125 -> ~37 (30%) in 300 steps. Adam is
  scale-free, so a larger β sharpens σ(−b·s) without larger steps; β = 4000 was no better.
- `--noise 1.25`, `--shift 1` (train.shift: σ uniform instead of the model's shift 3, which
  draws mostly high noise). A pair drawn at high σ has win and lose inputs the model cannot
  tell apart, so its s stays near 0 and its DGR near b/2: the share of such draws is a floor
  under the batch's mean DGR. DPO's end DGR / start, same seed: noise 0.5 at shift 3: 27%;
  noise 0.5 at shift 1: ~15%; noise 1.0 at shift 1: 2-10%. A more distinct loser (1.5) lowers
  DGR further but DPO's win_gap then barely rises (+5.6e-4 in one seed): the loser is so easy to
  tell apart that hurting it spares the winner. 1.25 balances the two.
- lr 1e-3 keeps DPO's win_gap below 0 at noise 1.0; 3e-3 makes DGR noisier (ends at 4-16%).
- Longer is not better: at 400 steps (seed 0) DPO's gaps keep rising (+2.2e-2, +4.2e-2) and
  the guard fires, but its DGR climbs back to 14% of the start (per-pair s spreads out).
Measured with `--quick` (1 thread, 2 CPU cores shared with other jobs, load average 4-7),
0.8-1.6 min per seed; held (DPO collapsed, Reg-DPO did not) in 5 of 5 seeds, 0-2 used to pick
the setting, 3-4 not; end DGR of DPO 29.9, 31.3, 38.3, 39.4, 49.2 (seed 4 within 2% of the
threshold). Reg-DPO's DGR falls too in this toy (the preference is easy to learn; 9-54), so
DGR alone does not separate the two here; its win_gap does: it stays below 0 (−6.5e-3 to
−1.3e-2; the SFT term keeps the policy better than the reference on the winners, as in §4.3)
and its guard never fires.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Verdict:
    """One run's Fig. 2 numbers from its metrics.jsonl rows (see the module docstring)."""

    dgr_start: float
    dgr_end: float  # mean over the guard's late half at the last step
    win_gap: float
    lose_gap: float
    guard_fired: bool  # the trainer's CollapseGuard flagged at least one step
    collapsed: bool  # all of: end DGR < fraction · start, both gaps > 0, guard fired

    def line(self, method: str) -> str:
        return (f"{method}: DGR {self.dgr_start:.1f} -> {self.dgr_end:.1f}, win_gap "
                f"{self.win_gap:+.1e}, lose_gap {self.lose_gap:+.1e}, guard fired "
                f"{'yes' if self.guard_fired else 'no'}")


def verdict(rows: list[dict], window: int, fraction: float) -> Verdict:
    def late_mean(metric: str) -> float:
        values = [r[metric] for r in rows[-max(1, window // 2):]
                  if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        return sum(values) / len(values) if values else math.nan  # null = a skipped step

    start, end = rows[0]["dgr"], late_mean("dgr")
    win, lose = late_mean("win_gap"), late_mean("lose_gap")
    fired = any(bool(r.get("collapse")) for r in rows)
    return Verdict(start, end, win, lose, fired,
                   end < fraction * start and win > 0 and lose > 0 and fired)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="the first of --seeds only (~2-4 min on 2 CPU cores)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one model, data set and pair of runs per seed")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="artifacts/experiments/dpo_vs_regdpo")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--frames", type=int, default=2, help="latent frames")
    p.add_argument("--side", type=int, default=8, help="latent height = width")
    p.add_argument("--noise", type=float, default=1.25, help="std of the lose perturbation")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--beta", type=float, default=2000.0)
    p.add_argument("--shift", type=float, default=1.0,
                   help="train.shift, the flow shift of the σ draws (1 = uniform)")
    p.add_argument("--collapse-window", type=int, default=50, help="train.collapse_window")
    p.add_argument("--collapse-fraction", type=float, default=0.1,
                   help="train.collapse_fraction")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on 2 busy shared cores, 2 threads oversubscribe "
                   "and ran a --quick run in 9 min instead of 1.6 min; the numbers are the same)")
    p.add_argument("--pretrain-steps", type=int, default=400,
                   help="full-weight steps that fit the base to the data before preference "
                   "training (0 = the reference keeps its random weights)")
    p.add_argument("--only", choices=list(LOSSES), help="train this run only (e.g. to redo one)")
    p.add_argument("--plot-only", action="store_true",
                   help="re-plot and summarise the metrics already under --out; train nothing")
    args = p.parse_args(argv)

    seeds = args.seeds[:1] if args.quick else args.seeds
    held = 0
    for seed in seeds:
        out = Path(args.out).resolve() / f"seed{seed}"
        store = Store(f"file://{out}/store")
        if not args.plot_only:
            train_runs(store, out, args, seed)
        runs = {label: read_metrics(store, f"runs/{label.lower()}/metrics.jsonl")
                for label in LOSSES if store.exists(f"runs/{label.lower()}/metrics.jsonl")}
        verdicts = report(runs, out, args, seed)
        held += all(label in verdicts for label in LOSSES) and verdicts["DPO"].collapsed \
            and not verdicts["Reg-DPO"].collapsed
    print(f"DPO collapsed and Reg-DPO did not in {held} of {len(seeds)} seed(s)")


# What defines a seed's model and data: a folder made with other values is not reused.
_MODEL_AND_DATA = ("layers", "pairs", "frames", "side", "noise", "pretrain_steps")


def train_runs(store: Store, out: Path, args: argparse.Namespace, seed: int) -> None:
    torch.set_num_threads(args.threads)
    model, ready = str(out / "model"), out / "model" / "ready.json"
    made = {k: getattr(args, k) for k in _MODEL_AND_DATA} | {"seed": seed}
    if ready.exists() and json.loads(ready.read_text()) != made:
        raise SystemExit(f"{out} holds a model and data made with {ready.read_text()}, not "
                         f"{json.dumps(made)}; pass a fresh --out or delete {out}")
    if not ready.exists():  # model, data (and pretraining) are made once per seed and --out
        build_model(out / "model", args.layers, seed)
        write_synthetic_pairs(store, "data/pairs", transformer_config(WanSpec("t2v", model)),
                              args.pairs, args.frames, args.side, args.noise, seed)
        if args.pretrain_steps:
            pretrain(model, store, "data/pairs", args.pretrain_steps, 1e-3, seed)
        ready.write_text(json.dumps(made))
    for label, loss in LOSSES.items():
        if args.only and label != args.only:
            continue
        cfg = TrainConfig.model_validate(dict(
            model=model, kind="t2v", dtype="float32", data="data/pairs", steps=args.steps,
            batch_size=args.batch_size, seed=seed, loss=loss | {"beta": args.beta},
            lora=dict(rank=8, alpha=16), optimizer=dict(lr=args.lr, weight_decay=0.0),
            shift=args.shift, collapse_window=args.collapse_window,
            collapse_fraction=args.collapse_fraction,
            checkpoint=dict(every=args.steps, resume=False)))
        start = time.perf_counter()
        result = train(cfg, store, f"runs/{label.lower()}")
        print(f"seed {seed} {label}: {result['steps']} steps in "
              f"{time.perf_counter() - start:.0f} s")


def read_metrics(store: Store, key: str) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(key).decode().splitlines()]


def report(runs: dict[str, list[dict]], out: Path, args: argparse.Namespace,
           seed: int) -> dict[str, Verdict]:
    setting = f"β={args.beta:g}, lr={args.lr:g}, seed {seed}"
    for label, rows in runs.items():
        print(fig2_panels(rows, out / f"{label.lower()}_fig2.png", f"{label}, {setting}"))
    if runs:
        steps = len(next(iter(runs.values())))
        print(compare_panels(runs, out / "dpo_vs_regdpo_fig2.png",
                             f"DPO vs Reg-DPO (r = DGR), {setting}, {steps} steps"))
    print(f"seed {seed}:")
    verdicts = {label: verdict(rows, args.collapse_window, args.collapse_fraction)
                for label, rows in runs.items()}
    for label, v in verdicts.items():
        print(v.line(label))
    return verdicts


if __name__ == "__main__":
    main()
