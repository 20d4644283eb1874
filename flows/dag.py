"""The DAG: every stage with the stages it reads, its config section, the code that defines its
output and its item function. One place says what depends on what (docs/architecture.md):

    acquire -> filter -> normalize -> negatives -> pairs -> precompute -> train -> evaluate
    data edges:  pairs <- normalize, negatives      evaluate <- pairs (test split), train

Dual-IPO (flows/ipo.py) runs R rounds of ROUND after the curation stages:

    normalize -> [refine (round 0: the critic's seed fine-tune)]
              -> [sample -> critique -> refine -> pairs (scored) -> precompute -> train
                  -> evaluate] x R

A round's stages record their run-index entries under `<stage>.r<k>` (round_entry) and read
their inputs from the same round (normalize, outside the rounds, from its plain entry).

A stage's code version digests its own `code` roots (infra.code: the functions that compute
its output, followed through everything they call) and the code versions of the stages it
reads, so editing how filter scores a clip re-keys filter and everything downstream of it, and
editing a docstring, a comment or an unrelated function re-keys nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from infra.code import code_digest
from infra.config import STAGE_CONFIGS, Section
from infra.store import digest


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    """The stages whose committed manifests this one reads (the data edges)."""
    code: tuple[str, ...]
    """"module:function" roots of the code that computes the output."""
    item: str | None = None
    """"module:function" of the item function, (store, out_dir, payload) -> row fields."""
    mode_reads: tuple[str, ...] = ()
    """Stages only one mode reads (pairs' scored mode reads critique): their code versions are
    not in this stage's, so the other modes keep their keys; the flow puts them in the stage
    key of the mode that reads them (mode_version)."""
    cluster: tuple[str, ...] = ()
    """The item maps (`StageRun.map` names) a cluster runner runs: CPU work whose workers
    need nothing but the store. The others (GPU models) stay in the flow's process."""

    @property
    def config(self) -> type[Section]:
        return STAGE_CONFIGS[self.name]

    @property
    def code_version(self) -> str:
        return code_version(self.name)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("acquire", reads=(), code=("tasks.acquire:acquire_one", "tasks.acquire:dedupe"),
          item="tasks.acquire:acquire_item", cluster=("acquire",)),
    # Filter's decode of a new clip may also make normalize's GT clip (the fused pass): both
    # stages' outputs depend on that code.
    Stage("filter", reads=("acquire",), code=("tasks.filter:analyze", "tasks.filter:decide",
                                               "tasks.filter:explain",
                                               "infra.gtspec:analyze_and_normalize"),
          item="tasks.filter:score_item", cluster=("filter",)),
    Stage("normalize", reads=("filter",), code=("tasks.normalize:normalize_one",
                                                "infra.gtspec:analyze_and_normalize"),
          item="tasks.normalize:normalize_item", cluster=("normalize",)),
    Stage("negatives", reads=("normalize",), code=("tasks.negatives:make_negatives",),
          item="tasks.negatives:negatives_item"),
    Stage("pairs", reads=("normalize", "negatives"),
          code=("tasks.pairs:negative_pairs", "tasks.pairs:held_out_rows",
                "tasks.pairs:annotated_candidates", "tasks.pairs:import_pairs"),
          mode_reads=("critique",)),
    Stage("precompute", reads=("pairs",), code=("tasks.precompute:precompute_pair",
                                                 "tasks.precompute:precompute_video",
                                                 "models.runtime:encode_prompts"),
          item="tasks.precompute:precompute_item"),
    Stage("train", reads=("precompute",), code=("tasks.train:Trainer",)),
    Stage("evaluate", reads=("pairs", "train"),
          code=("tasks.evaluate:generate_one", "tasks.evaluate:proxy_one",
                "tasks.evaluate:run_vbench"),
          item="tasks.evaluate:generate_item", cluster=("evaluate-proxy",)),
    # Dual-IPO's own stages (flows/ipo.py).
    Stage("sample", reads=("normalize",), code=("tasks.sample:sample_video",),
          item="tasks.sample:sample_item"),
    Stage("critique", reads=("sample",), code=("tasks.critique:critique_prompt",),
          item="tasks.critique:critique_item"),
    # The critic's refinement (SRPO) on its round's chains, or round 0's fine-tune on the
    # human seed pairs; its adapter judges the next round (critique keys hold its sha256).
    Stage("refine", reads=("critique",), code=("tasks.critic_refine:refine_critic",)),
)}
# The Reg-DPO pipeline (flows/pipeline.py), and one Dual-IPO round (flows/ipo.py).
ORDER: tuple[str, ...] = ("acquire", "filter", "normalize", "negatives", "pairs", "precompute",
                          "train", "evaluate")
ROUND: tuple[str, ...] = ("sample", "critique", "refine", "pairs", "precompute", "train",
                          "evaluate")
assert set(STAGES) == set(STAGE_CONFIGS), "flows/dag.py and infra/config/run.py list different stages"
CURATE: tuple[str, ...] = ("acquire", "filter", "normalize")
# Sections a run may leave out (None): the run then stops before that stage.
OPTIONAL: tuple[str, ...] = ("train", "evaluate")


def round_entry(stage: str, round: int | None) -> str:
    """The run-index entry of `stage` in Dual-IPO round `round` (`pairs.r2`); the plain stage
    name outside the rounds, or for a stage no round runs (normalize)."""
    return f"{stage}.r{round}" if round is not None and stage in ROUND else stage


@lru_cache(maxsize=None)
def mode_version(stage: str, read: str) -> str:
    """The code version a mode adds to `stage`'s key when it reads `read` (one of mode_reads)."""
    if read not in STAGES[stage].mode_reads:
        raise ValueError(f"{stage} has no mode that reads {read} (flows/dag.py)")
    return code_version(read)


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    """Digest of the stage's own code and, transitively, of every stage it reads."""
    s = STAGES[stage]
    return digest([code_digest(*s.code), [code_version(r) for r in s.reads]], 16)
