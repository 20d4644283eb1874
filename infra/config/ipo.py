"""Config of Dual-IPO's rounds (arXiv 2502.02088; docs/architecture.md "Dual-IPO rounds"): how
many rounds, how the policy samples each round, which critic judges, and which judgments
become training rows. The round's precompute, train and evaluate use the run's own sections.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from infra.config.base import Section
from infra.config.critic import CriticConfig, SrpoConfig
from infra.config.wan import WAN_NEGATIVE_PROMPT, WanEdge, WanFrames


class SampleConfig(Section):
    """The `ipo.sample` section: N videos per GT clip's prompt from the round's policy (the
    base in round 1, base + the previous round's adapter after), renormalized to the GT spec.
    Every GT clip is sampled, as negatives makes one for every clip; the pairs stage keeps the
    train split's (a held-out clip's videos never reach training)."""

    samples_per_prompt: int = Field(4, ge=2, description="N: videos per training prompt and "
                                    "round (a pairwise judgment needs two; N videos give "
                                    "N(N-1)/2 pairs per prompt)")
    seed: int = Field(0, ge=0, description="a video's seed derives from (seed, round, clip, "
                      "sample index) and is recorded in its row")
    steps: int = Field(50, ge=1, description="inference steps (Wan's default 50)")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance scale (Wan: 5.0)")
    negative_prompt: str = Field(WAN_NEGATIVE_PROMPT, description="classifier-free "
                                 "guidance's negative prompt (Wan's own by default)")
    short_edge: WanEdge = Field(None, ge=16, description="generation short edge (px, multiple "
                                "of 16); None = the GT clip's size. Outputs are renormalized "
                                "to the GT spec either way")
    frames: WanFrames = Field(None, ge=1, description="generated frames (4k + 1); None = the "
                              "GT clip's")
    device: str | None = Field(None, description="torch device; None = cuda if available")
    workers: int = Field(1, ge=1, description="videos in flight (one pipeline per process: "
                         "inference is serialized, renormalizing and uploading overlap)")


class CritiqueConfig(Section):
    """The `ipo.critique` section: which judgments the critic makes of a round's videos."""

    critic: CriticConfig = Field(CriticConfig(), description="the VLM that judges")
    pairwise: bool = Field(True, description="judge every two videos of a prompt, in both "
                           "orders (the pairs DPO trains on)")
    pointwise: bool = Field(True, description="judge every video good/bad (the rows KTO "
                            "trains on)")
    seed: int = Field(0, ge=0, description="a judgment's seed derives from (seed, its videos); "
                      "chain i of an order is seeded from it (models.critic.chain_seed)")
    human_labels: str | None = Field(None, description="held-out human-labelled pairs "
                                     "(regdpo.critic-seed.v1 CSV/Parquet, local videos; "
                                     "infra/critic_seed.py) the critic also judges each round: "
                                     "its agreement with them is the paper's human preference "
                                     "accuracy (an abstain counts as a miss). None = not measured")
    workers: int = Field(1, ge=1, description="prompts in flight (the critic is one model "
                         "per process: generation is serialized)")

    @model_validator(mode="after")
    def _some(self) -> "CritiqueConfig":
        if not (self.pairwise or self.pointwise):
            raise ValueError("ipo.critique judges nothing: set pairwise and/or pointwise: true")
        return self


class ScoredPairsConfig(Section):
    """The `ipo.pairs` section: which of the critic's majority verdicts become training rows
    (the pairs stage's `scored` mode). Vote share = the majority's votes over ALL chains of
    the judgment (abstains count against it); margin = (majority − minority votes) over all
    chains. A judgment with no majority (a tie, or every chain abstaining) makes no row."""

    min_vote_share: float = Field(0.6, gt=0, le=1, description="keep a verdict whose vote "
                                  "share is at least this")
    min_margin: float = Field(0.2, ge=0, le=1, description="and whose margin over the other "
                              "side is at least this (the certainty of the preference)")
    pointwise: bool = Field(True, description="add pointwise rows (desirable = the majority "
                            "said good) for KTO")
    real: bool = Field(True, description="add the run's real GT clips of the train prompts "
                       "as rows of kind `real` (the NLL regulariser's data)")


class IpoConfig(Section):
    """The `ipo` section: Dual-IPO's R rounds of sample → critique → pairs → precompute →
    train → evaluate (flows/ipo.py); None on RunConfig = the run is not a Dual-IPO run."""

    rounds: int = Field(3, ge=1, description="R: rounds in the run (the paper reports 3, and "
                        "5 for Wan-1.3B)")
    sample: SampleConfig = Field(SampleConfig(), description="how each round's policy samples")
    critique: CritiqueConfig = Field(CritiqueConfig(), description="the critic and its "
                                     "judgments")
    pairs: ScoredPairsConfig = Field(ScoredPairsConfig(), description="which verdicts become "
                                     "training rows")
    srpo: SrpoConfig = Field(SrpoConfig(), description="the critic's self-refinement (SRPO)")
