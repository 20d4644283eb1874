"""Where the items of the item-parallel stages run (docs/architecture.md, "Scale-out").

    runner: {kind: threads}                                   # the default: threads of the flow
    runner: {kind: dask, workers: 4}                          # a local Dask cluster, 4 processes
    runner: {kind: dask, address: tcp://sched:8786}           # an existing Dask cluster

The runner is run control, like a stage's `workers`: it is in no key, and one config gives the
same manifests on every runner. A cluster's workers read and write the store themselves, so the
store must be one they reach: s3://, or a file path every worker mounts (`shared_store: true`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from infra.config.base import Section

class RunnerConfig(Section):
    """The task runner of acquire, filter, normalize and evaluate's scoring."""

    kind: Literal["threads", "dask"] = Field(
        "threads", description="threads: each stage's `workers` threads in the flow's process; "
        "dask: a Dask cluster through prefect-dask (pip install 'regdpo[dist]')")
    address: str | None = Field(
        None, description="dask: the scheduler of a running cluster (tcp://host:8786); empty = "
        "start a local cluster of `workers` processes for each stage")
    workers: int | None = Field(
        None, ge=1, description="dask without an address: worker processes of the local "
        "cluster (one thread each); empty = one per CPU")
    shared_store: bool = Field(
        False, description="a file:// store is on a path every cluster worker mounts at the "
        "same place (NFS, Lustre, ...); s3:// stores are shared anyway")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> "RunnerConfig":
        if self.kind == "threads":
            for field in ("address", "workers"):
                if getattr(self, field) is not None:
                    raise ValueError(f"runner.{field} is for a cluster: set runner.kind: dask, or "
                                     f"drop runner.{field} (threads run each stage's `workers` "
                                     "items at once)")
        if self.address is not None and self.workers is not None:
            raise ValueError("runner.workers sizes a local cluster; the cluster at runner.address "
                             "has its own workers: drop runner.workers")
        if self.address is not None and "://" not in self.address:
            raise ValueError(f"runner.address {self.address!r} is not a scheduler address: give "
                             "it as tcp://HOST:PORT (the `dask scheduler` default port is 8786)")
        return self

    @property
    def cluster(self) -> bool:
        return self.kind != "threads"


def store_problem(runner: RunnerConfig, store: str) -> str | None:
    """Why `store` cannot serve `runner`'s workers (None: it can). A local cluster's workers
    share this machine's files; a cluster elsewhere needs s3:// or a declared shared path."""
    scheme = store.split("://", 1)[0] if "://" in store else "file"
    if not runner.cluster or scheme != "file" or runner.address is None:
        return None
    path = store.split("://", 1)[-1]
    if not runner.shared_store:
        return (f"runner.kind {runner.kind} at runner.address has workers on other machines, but "
                f"the store is a local path ({path}): they would write where no stage reads. "
                "Use an s3:// store, or put the store on a path every worker mounts at the same "
                "place and set runner.shared_store: true")
    if not path.startswith("/"):
        return (f"runner.shared_store: the store path {path!r} is relative, and a cluster's "
                "workers run in other folders: give the shared mount's absolute path "
                "(store: file:///shared/regdpo)")
    return None
