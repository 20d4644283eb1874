"""acquire flow: list sources -> fetch + probe + criteria per video -> copy accepted into the store."""

from __future__ import annotations

import os

from prefect import flow

from flows.dag import STAGES
from flows.stage import StageRun
from infra.config import AcquireConfig
from infra.store import digest
from tasks.acquire import Candidate, dedupe, list_candidates

STAGE = STAGES["acquire"]


def _identity(cand: Candidate) -> dict:
    """What makes a source's bytes: its location, plus size and mtime for local files."""
    ident = {"source": cand.source, "caption": cand.caption}
    if "://" not in cand.source and os.path.exists(cand.source):
        st = os.stat(cand.source)
        ident |= {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return ident


@flow(name="acquire", flow_run_name="acquire/{run}", log_prints=True)
def acquire(run: str = "toy", config: AcquireConfig | None = None, store: str = "file://./artifacts",
            overrides: list[str] | None = None) -> dict:
    """Select raw videos by metadata and copy the accepted ones into the store.

    Args:
        run: the run's name (runs/<run>/ in the store); its other stages' outputs are read
            from the run index.
        config: this stage's section; empty = the section the run last used (recorded in
            the run index), not the real-model defaults.
        store: artifact store URL (file://... or s3://bucket/prefix; credentials come from
            the environment).
        overrides: `--set`-style changes applied on top, e.g. ["acquire.workers=4"];
            validated before any work.
    """
    s = StageRun(STAGE, run, config, store, overrides)
    settings = s.cfg.model_dump(exclude={"sources", "workers"})
    candidates, bad = list_candidates(s.cfg)
    work = [s.work(_identity(c), settings, os.path.basename(c.source)[:60],
                   {"id": c.id, "source": c.source,
                    "candidate": {"source": c.source, "caption": c.caption, "root": c.root},
                    "config": s.cfg.model_dump()})
            for c in candidates]
    sources = sorted([w[0] for w in work]) + sorted(b["id"] for b in bad)
    if entry := s.reuse(settings, [digest(sources)]):
        return entry
    # The item retries transient errors itself (acquire.download.retries): no Prefect retries on top.
    rows = dedupe(s.map(work, s.cfg.workers, retries=0) + bad)
    return s.commit(rows, {"sources": len(s.cfg.sources)})
