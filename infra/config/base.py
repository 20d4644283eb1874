"""The pieces every config section uses: the YAML loader, the Section base, buckets, errors.

Nothing under infra/config imports torch, diffusers or any stage: a config loads, validates and
renders as a Prefect form without the code it configures (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import re
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_BUCKET = re.compile(r"^(\d+):(\d+)$")


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: `16:9` stays the string '16:9', not 969."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


class ConfigError(ValueError):
    """A run config that cannot be used; the message names each key path and the fix."""


class Section(BaseModel):
    """A config section: unknown keys are errors, and so are inf/nan where a number is meant."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def parse_bucket(bucket: str) -> tuple[int, int]:
    m = _BUCKET.match(bucket)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise ValueError(f"bucket {bucket!r} is not of the form W:H (e.g. 16:9)")
    return int(m.group(1)), int(m.group(2))


def _check_buckets(v: list[str]) -> list[str]:
    for b in v:
        parse_bucket(b)
    return v


# Aspect buckets "W:H" (paper A.1: 16:9, 9:16, 3:4, 1:1), at least one.
Buckets = Annotated[list[str], Field(min_length=1), AfterValidator(_check_buckets)]

