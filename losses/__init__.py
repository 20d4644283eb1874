"""Pure preference losses: per-sample errors and a config in, (loss, metrics) out. No I/O."""

from losses.errors import flow_error, masked_error
from losses.preference import (
    KINDS,
    Metrics,
    PreferenceLoss,
    add_nll,
    dgr,
    dpo_loss,
    kto_loss,
    nll_terms,
    pointwise_loss,
    preference_loss,
    region_loss,
    regdpo_loss,
    sft_loss,
)

__all__ = [
    "KINDS",
    "Metrics",
    "PreferenceLoss",
    "add_nll",
    "dgr",
    "dpo_loss",
    "flow_error",
    "kto_loss",
    "masked_error",
    "nll_terms",
    "pointwise_loss",
    "preference_loss",
    "region_loss",
    "regdpo_loss",
    "sft_loss",
]
