"""Config of the Dual-IPO critic (models/critic.py) and its self-refinement, SRPO
(losses/srpo.py, tasks/critic_refine.py). arXiv 2502.02088; docs/architecture.md "Dual-IPO critic".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infra.config.base import Section

# What the critic reasons over before its verdict: the qualities the paper's critic judges
# (its abstract: "subject consistency, motion smoothness and aesthetic quality", plus prompt
# following, its semantic score). One line of reasoning per dimension, then the verdict.
CRITIC_DIMENSIONS = ("prompt alignment", "subject consistency", "motion smoothness",
                     "aesthetic quality")
# Qwen2-VL's language-model attention projections (the vision tower's are `qkv`/`proj`).
CRITIC_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class CriticConfig(Section):
    """The `critic` section: which VLM judges, and how it samples its reasoning chains."""

    model: str = Field("", description="hub id (in the local HF cache; nothing is downloaded) or "
                       "local folder (save_pretrained layout) of a Qwen2-VL / Qwen2.5-VL-class VLM")
    device: str = Field("cpu", description="torch device the critic runs on")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype (bfloat16 on a GPU); LoRA weights stay float32")
    chains: int = Field(5, ge=1, description="K: sampled reasoning chains per judgment and "
                        "order (a pairwise judgment samples K in each of the two orders)")
    temperature: float = Field(0.7, gt=0, description="sampling temperature of each chain")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass of each chain")
    max_new_tokens: int = Field(256, ge=1, description="length limit of one chain")
    frames: int = Field(8, ge=1, description="frames sampled evenly from each video; each goes "
                        "to the VLM as one image")
    frame_short_edge: int = Field(224, ge=28, description="frames are decoded at this short "
                                  "edge (the processor then snaps them to its patch grid)")
    dimensions: list[str] = Field(default_factory=lambda: list(CRITIC_DIMENSIONS), min_length=1,
                                  description="what each chain must reason about, one line each, "
                                  "before its verdict line")


class SrpoConfig(Section):
    """The `ipo.srpo` section: the critic's self-refinement (the `refine` stage, flows/refine.py).

    Round 0 (before round 1's critique, when `seed_data` is set): the critic gets a LoRA adapter
    fine-tuned on the human-labelled pairs with their rationales (SFT: the answer it should write,
    reasoning then verdict, in both orders and pointwise). Round r (every `every` rounds, and not
    the last: nothing after it would use the critic): pseudo-labels from round r's own
    critique, the majority chain preferred over a dissenting one; PCE = σ(β(R_w − Q)) with
    R = log π_critic/π_base and Q the mean over the round's pseudo-labels; the ones with
    PCE > pce_threshold train the adapter with PCE-weighted DPO. The refined critic judges the
    next round. A critic without an adapter has R = 0 for every chain (PCE = 0.5, nothing kept),
    so refinement needs `seed_data` (or an adapter from an earlier refinement)."""

    every: int = Field(1, ge=0, description="refine the critic after every k-th round's "
                       "critique (0 = never: the critic of round 0, or the VLM as is, judges "
                       "every round)")
    seed_data: str | None = Field(None, description="the human-labelled seed pairs with "
                                  "rationales (regdpo.critic-seed.v1 CSV/Parquet, local videos; "
                                  "infra/critic_seed.py): round 0 fine-tunes the critic's "
                                  "adapter on them. None = no round 0")
    seed_steps: int = Field(200, ge=1, description="optimizer steps of round 0's fine-tune, each "
                            "on `batch` examples (a seed pair gives 4: both orders, each video "
                            "pointwise)")
    seed_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of round 0's fine-tune")
    steps: int = Field(50, ge=1, description="optimizer steps of one round's SRPO, each on "
                       "`batch` of the kept pseudo-labels (cycled in a seeded order)")
    batch: int = Field(8, ge=1, description="examples per optimizer step (accumulated one at "
                       "a time: memory is one example's)")
    max_pairs: int = Field(512, ge=1, description="pseudo-labels a round's SRPO scores at most "
                           "(a seeded sample of them when the round has more)")
    seed: int = Field(0, ge=0, description="the order of examples and the sample of "
                      "pseudo-labels derive from it")
    beta: float = Field(0.1, gt=0, description="DPO β of the critic's loss (language-model DPO's "
                        "usual 0.1); PCE = σ(β·(R − Q)) uses the same β")
    pce_threshold: float = Field(0.5, ge=0, lt=1, description="keep a pseudo-label only if its "
                                 "PCE is above this (the paper: 0.5)")
    rank: int = Field(16, ge=1, description="LoRA rank of the critic's adapter")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (update scaled by alpha/rank)")
    targets: list[str] = Field(default_factory=lambda: list(CRITIC_LORA_TARGETS), min_length=1,
                               description="module-name suffixes that get an adapter")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the adapter")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
