"""Re-running one stage as the UI does (issue 13): an empty form means the section the run last
used, `overrides` take the CLI's --set syntax and are validated before any work, and flow runs
are named <stage>/<run> and tagged run:<name>, stage:<stage> so the UI filters by run."""

from __future__ import annotations

import pytest

from tests.conftest import toy_config


def test_the_form_says_empty_means_recorded():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import FLOWS

    for name, fl in FLOWS.items():
        props = parameter_schema(fl.fn).model_dump()["properties"]
        assert props["config"].get("default") is None, name
        assert "last used" in props["config"]["description"], name
        assert props["overrides"]["description"] and props["run"]["description"], name
        assert props["store"]["description"], name
    assert "torchrun" in parameter_schema(FLOWS["train"].fn).model_dump()["properties"]["nproc"]["description"]


def test_a_stage_rerun_starts_from_the_run_and_takes_overrides(prefect_api, toy_dir, tmp_path):
    from prefect import get_client

    from flows.acquire import acquire
    from infra.config import ConfigError
    from infra.store import Store

    cfg = toy_config(toy_dir, f"file://{tmp_path}/store")
    acquire(run="ui", config=cfg.acquire, store=cfg.store)
    acquire(run="ui", store=cfg.store, overrides=["acquire.fps_max=40"])  # the UI: empty form
    recorded = Store(cfg.store).read_run("ui")["stages"]["acquire"]["config"]
    assert recorded["fps_max"] == 40
    assert recorded["sources"] == cfg.acquire.model_dump(mode="json")["sources"]  # not the defaults

    with pytest.raises(ConfigError, match="acquire.fps_max"):
        acquire(run="ui", store=cfg.store, overrides=["acquire.fps_max=-1"])
    with pytest.raises(ConfigError, match="takes only acquire"):
        acquire(run="ui", store=cfg.store, overrides=["filter.max_cuts=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        acquire(run="ui", store=cfg.store, overrides=["acquire.fps_maximum=40"])
    assert Store(cfg.store).read_run("ui")["stages"]["acquire"]["config"]["fps_max"] == 40

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    # Filtered by the API: the session's server holds more runs than one unfiltered page.
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["acquire/ui"])))
    assert len(runs) == 5
    assert all({"run:ui", "stage:acquire"} <= set(r.tags) for r in runs), [r.tags for r in runs]
