"""The `regdpo` command: run a config, make toy data, print a run's report, serve the GSB page."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reg-DPO with GT-Pair as a Prefect DAG.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"regdpo {version('regdpo')}")
        except PackageNotFoundError:  # a source tree that was never installed
            typer.echo("regdpo (not installed: run `make install`)")
        raise typer.Exit()


@app.callback()
def _main(_: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit")) -> None:
    """Reg-DPO with GT-Pair as a Prefect DAG."""


# Prefect's 20 s default misses on a loaded 2-core machine; the CLI waits longer.
_STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def _run_name(name: str) -> str:
    """A run name is one store path part; anything else is refused before the store is read."""
    from infra.store import PathEscapeError, safe_part

    try:
        return safe_part(name)
    except PathEscapeError:
        _fail(f"--run {name!r} is not a run name: use letters, digits and . _ = - "
              "(no slashes, no leading dot)")


def _fail(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: str = typer.Argument(..., help="run config YAML, e.g. configs/toy.yaml"),
    run_name: Optional[str] = typer.Option(None, "--run", help="run name (default: the config's `name`)"),
    only: Optional[str] = typer.Option(None, help="comma-separated stages to run, e.g. filter,normalize"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: key.path=value"),
    nproc: int = typer.Option(1, min=1, help="processes (GPUs) for the train stage; > 1 launches torchrun"),
    nnodes: int = typer.Option(1, min=1, help="machines in a multi-node train stage (with --only train)"),
    node_rank: int = typer.Option(0, min=0, help="this machine's index 0..nnodes-1; node 0 commits"),
    rdzv: Optional[str] = typer.Option(None, help="HOST:PORT of the c10d rendezvous, the same on every node"),
) -> None:
    """Run the pipeline (or --only some stages) for a run."""
    from infra import shutdown
    from infra.config import ConfigError, load_config

    shutdown.install()

    try:
        cfg = load_config(config, set_ + ([f"name={run_name}"] if run_name else []))
    except ConfigError as e:
        _fail(str(e))
    from flows.dag import ORDER
    from flows.pipeline import check_stages, pipeline, selected
    from flows.preflight import PreflightError, preflight
    from flows.stage import heartbeats_if_watched

    stages = [s.strip() for s in only.split(",") if s.strip()] if only else None
    if cfg.ipo is not None:
        _run_ipo(cfg, stages, nproc, nnodes)
        return
    try:  # before Prefect starts: a bad stage name or a missing model costs no flow run
        if nnodes > 1 and stages != ["train"]:
            raise ValueError("--nnodes > 1 trains across machines: give --only train (run the "
                             "data stages first, once) and the same --rdzv on every node")
        from flows.train import check_nodes

        check_nodes(nnodes, node_rank, rdzv)
        check_stages(ORDER, cfg, stages)
        preflight(cfg, selected(ORDER, cfg, stages))
    except (PreflightError, ValueError) as e:
        _fail(f"run {cfg.name!r}: {e}")
    try:
        with heartbeats_if_watched():
            results = pipeline(run=cfg.name, config=cfg, only=stages, nproc=nproc, nnodes=nnodes,
                               node_rank=node_rank, rdzv=rdzv)
    except (LookupError, ValueError) as e:
        _fail(f"run {cfg.name!r} failed: {e}")
    except shutdown.ShutdownRequested as e:
        typer.echo(f"stopped: {e}; committed work stands, rerun to continue", err=True)
        raise typer.Exit(shutdown.exit_code())
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        _fail(f"Prefect's ephemeral API server did not start within "
              f"{os.environ.get(_STARTUP_TIMEOUT)} s (a loaded machine?): raise "
              f"{_STARTUP_TIMEOUT}, or start a server in its own shell (`prefect server start`) "
              "and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    for stage, entry in results.items():
        typer.echo(f"{stage:10s} {entry['counts']}  {entry['manifest']}")


def _run_ipo(cfg, stages: list[str] | None, nproc: int, nnodes: int) -> None:
    """A config with an `ipo` section runs Dual-IPO's rounds (flows/ipo.py)."""
    from infra import shutdown
    from flows.dag import CURATE
    from flows.ipo import ROUND_STAGES, ipo
    from flows.preflight import PreflightError, preflight
    from flows.stage import heartbeats_if_watched

    try:
        if stages or nproc != 1 or nnodes != 1:
            raise ValueError("a Dual-IPO run (an `ipo` section) runs whole: drop --only, "
                             "--nproc and --nnodes (re-run one round's stage from its "
                             "deployment with `round`)")
        preflight(cfg, list(CURATE) + list(ROUND_STAGES))
    except (PreflightError, ValueError) as e:
        _fail(f"run {cfg.name!r}: {e}")
    try:
        with heartbeats_if_watched():
            results = ipo(run=cfg.name, config=cfg)
    except (LookupError, ValueError) as e:
        _fail(f"run {cfg.name!r} failed: {e}")
    except shutdown.ShutdownRequested as e:
        typer.echo(f"stopped: {e}; committed work stands, rerun to continue", err=True)
        raise typer.Exit(shutdown.exit_code())
    for name, entry in results.items():
        if name == "r0":
            typer.echo(f"round 0: the critic fine-tuned on the seed pairs; critic adapter "
                       f"{entry['stages']['refine']['adapter']}")
            for stage, e in entry["stages"].items():
                typer.echo(f"  {stage:10s} {e['counts']}  {e['manifest']}")
        elif name.startswith("r") and name[1:].isdigit():
            trained = "trained" if entry["trained"] else f"not trained ({entry['why_not_trained']})"
            typer.echo(f"round {entry['round']}: {trained}; adapter {entry['adapter']}"
                       + (f"; critic adapter {entry['critic_adapter']}"
                          if entry.get("critic_adapter") else ""))
            for stage, e in entry["stages"].items():
                typer.echo(f"  {stage:10s} {e['counts']}  {e['manifest']}")
        else:
            typer.echo(f"{name:10s} {entry['counts']}  {entry['manifest']}")


@app.command("toy-data")
def toy_data(
    out: str = typer.Argument(..., help="folder to write clips/, captions.csv, edge/, critic-seed/ and models/ into"),
    edge_cases: bool = typer.Option(True, help="also write hostile/odd inputs into edge/"),
) -> None:
    """Generate toy clips (clean + one of each rejection kind) and the critic's seed pairs with
    ffmpeg's lavfi sources, and the tiny models the toy configs load (captioner, Wan2.1 I2V and
    T2V, a Qwen2-VL critic taught the answer format)."""
    from tasks.toy_data import make_toy_data, make_toy_models

    path = make_toy_data(out, edge_cases=edge_cases)
    make_toy_models(out)
    typer.echo(f"toy data in {path}")


@app.command()
def report(
    run_name: str = typer.Option(..., "--run", help="run name"),
    store: str = typer.Option(os.environ.get("REGDPO_STORE", "file://./artifacts"), help="artifact store URL"),
) -> None:
    """Print a run's stage summaries, its evaluation tables (paper Tables 2/5/6) and GSB tallies."""
    from infra.stage import entry_stage, stage_dir
    from infra.store import NotCommittedError, Store
    from tasks.gsb.ratings import GSBError, markdown_table, run_tally
    from tasks.report import entry_order, render_report

    st = Store(_store(store))
    try:
        typer.echo(render_report(st, _run_name(run_name)))
    except LookupError as e:
        _fail(str(e))
    stages = st.read_run(run_name)["stages"]
    for stage in sorted(stages, key=entry_order):
        try:
            success = st.read_success(stage_dir(entry_stage(stage)[0], stages[stage]["key"]))
        except NotCommittedError:
            continue  # the table above says so
        not_ok = [r for r in success["by_reason"] if r["status"] != "ok"]
        typer.echo(f"\n{stage}: computed {success['computed']}, reused {success['reused']}, "
                   f"{success['seconds']} s")
        for row in not_ok:
            typer.echo(f"  {row['status']:9s} {row['count']:5d}  {row['reason']}")
    if st.list(f"runs/{run_name}/gsb/ratings"):
        try:
            typer.echo("\nGSB (human ratings)\n" + markdown_table(run_tally(st, run_name)))
        except GSBError as e:
            typer.echo(f"\nGSB: {e}")


gsb_app = typer.Typer(no_args_is_help=True, help="GSB human rating of a run's evaluate videos (paper §4.1).")
app.add_typer(gsb_app, name="gsb")


def _store(url: str) -> str:
    """A store URL with credentials or a query string is refused, without repeating it."""
    from infra.store import StoreError, check_store_url

    try:
        return check_store_url(url)
    except StoreError as e:
        _fail(f"--store: {e}")


def _pairs(pair: list[str]) -> list[str] | None:
    return [p for p in pair if p.strip()] or None


@gsb_app.command("serve")
def gsb_serve(
    run_name: str = typer.Option(..., "--run", help="run name (its committed evaluate manifest is rated)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind; anything but loopback exposes the page"),
    port: int = typer.Option(8765, help="TCP port"),
    store: str = typer.Option(os.environ.get("REGDPO_STORE", "file://./artifacts"), help="artifact store URL"),
    pair: list[str] = typer.Option([], "--pair", help="CANDIDATE,BASELINE to compare (repeatable; "
                                   "default: every model vs base)"),
) -> None:
    """Serve the A/B rating page and the tallies for a run."""
    from tasks.gsb.ratings import GSBError
    from tasks.gsb.web import build_app, serve

    try:
        app = build_app(_store(store), _run_name(run_name), _pairs(pair), host)
    except GSBError as e:
        _fail(f"gsb: {e}")
    typer.echo(f"GSB rating page for run {run_name}: http://{host}:{port}/")
    serve(app, host, port)


@gsb_app.command("tally")
def gsb_tally(
    run_name: str = typer.Option(..., "--run", help="run name"),
    store: str = typer.Option(os.environ.get("REGDPO_STORE", "file://./artifacts"), help="artifact store URL"),
    pair: list[str] = typer.Option([], "--pair", help="CANDIDATE,BASELINE (repeatable; default: every model vs base)"),
) -> None:
    """Print the GSB table (Good/Same/Bad and Score per comparison) from the stored ratings."""
    from infra.store import Store
    from tasks.gsb.ratings import GSBError, markdown_table, run_tally

    try:
        typer.echo(markdown_table(run_tally(Store(_store(store)), _run_name(run_name), _pairs(pair))))
    except GSBError as e:
        _fail(f"gsb: {e}")


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(_STARTUP_TIMEOUT, "90")
    app()


if __name__ == "__main__":
    sys.exit(main())
