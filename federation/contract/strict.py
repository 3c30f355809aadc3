"""The base of every record of the study contract: strict, frozen, finite."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown fields refused; no float may be infinite or NaN.

    Every float in a study is a time, a rate, a fraction or a bound the sites compute with: `.inf` or `.nan`
    was accepted by `study check` and approval and then refused every round (max_grad_norm: .inf), so it is
    refused here, at load, with the field named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
