"""The site policy: the rules one hospital's data steward sets, in one YAML file, binding on every study.

Unknown settings are refused rather than ignored: a misspelt `site_epsilon_ceilng` must never fall back
silently to the default, because the default is not what the steward decided. For the same reason a
setting written twice, an infinite or NaN number (`.inf` as a ceiling would mean no ceiling at all) and
a file far larger or deeper than a policy can be are refused when the file is read
(federation.common.yaml_files). Errors name the file and the setting so the steward can fix the file
without reading code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federation.common.validation import describe
from federation.common.yaml_files import YamlLimits, read_yaml_file

# A policy is a dozen settings with comments: 1 KB. 64 KiB leaves room for any commentary and refuses
# a wrong file (a data export, a log) at once.
POLICY_FILE = YamlLimits(
    what="a policy file",
    max_bytes=64 * 2**10,
    max_depth=20,
    max_values=5_000,
    hint="a policy is a dozen settings (see configs/policy-example.yaml); is it the right file?",
)


class PolicyError(ValueError):
    """The policy file cannot be read or breaks a rule; the message names the file and the setting."""


class SitePolicy(BaseModel):
    """What this hospital allows. Defaults are the conservative choice, not the convenient one."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    require_dp: bool = Field(True, description="Refuse any training round that is not differentially private.")
    min_noise_multiplier: float = Field(
        0.5, ge=0, description="Privacy floor: DP-SGD noise below this is 'DP' in name only and is refused."
    )
    max_delta: float = Field(1e-5, gt=0, lt=1, description="Largest delta any study may use at this site.")
    study_epsilon_ceiling: float = Field(10.0, gt=0, description="Most epsilon one study may spend at this site.")
    site_epsilon_ceiling: float = Field(
        30.0, gt=0, description="Most epsilon all studies together may spend (sum of per-study epsilons)."
    )
    min_cohort_size: int = Field(100, ge=1, description="Smallest cohort this site will train or evaluate on.")
    min_cell_count: int = Field(10, ge=1, description="Any count that leaves the site below this is suppressed.")
    disclose_data_period: bool = Field(
        True,
        description="Send the calendar months the training data cover (from the month of the min_cell_count-th "
        "earliest index date to that of the min_cell_count-th latest) for the model card; false sends none.",
    )
    twin_query_studies: tuple[str, ...] = Field(
        (),
        description="Studies whose patient twin may be run on this site's patients (`twinfed twin patient`), by "
        "study id; none by default.",
    )
    require_secure_aggregation: bool = Field(False, description="Only join rounds that use secure aggregation.")
    evaluation_release: Literal["dp", "exact"] = Field(
        "dp",
        description="How evaluation leaves the site: 'dp' (noisy score histograms, epsilon in the ledger) or "
        "'exact' (exact aggregates, every cell at or above min_cell_count, no epsilon).",
    )
    allow_non_private: bool = Field(
        False,
        description="Take part in studies with privacy mode 'none' (a non-private baseline under a data-sharing "
        "agreement). Needs require_dp: false.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SitePolicy:
        if self.allow_non_private and self.require_dp:
            raise ValueError(
                "allow_non_private: true contradicts require_dp: true; a site that accepts non-private studies sets "
                "require_dp: false as well"
            )
        return self


def parse_policy(data: object, source: str = "<policy>") -> SitePolicy:
    """Validate already-parsed YAML; an empty file means every default."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a site policy is a mapping of settings (e.g. 'study_epsilon_ceiling: 8')")
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as exc:
        problems = describe(exc, SitePolicy, "policy")
        raise PolicyError(f"{source}: the site policy is not valid:\n  - " + "\n  - ".join(problems)) from None


def load_policy(path: Path) -> SitePolicy:
    """Read and validate the data steward's policy file (bounded in size and depth before it is parsed)."""
    path = Path(path)
    data = read_yaml_file(path, POLICY_FILE, PolicyError, missing_hint="the data steward writes it (see configs/)")
    return parse_policy(data, str(path))


def suppress_small_counts(
    metrics: Mapping[str, float | int], count_keys: Iterable[str], min_cell: int
) -> tuple[dict[str, float | int], list[str]]:
    """Drop every count below the cell-count floor before it leaves the site.

    A count of 3 patients with an outcome can identify them; zero reveals no one and is kept. Only the
    keys named in `count_keys` are counts; other metrics (loss, epsilon) pass through. Returns the kept
    metrics and the names of the suppressed ones, so the suppression itself is reported, not silent.
    """
    counts = set(count_keys)
    kept: dict[str, float | int] = {}
    suppressed: list[str] = []
    for key, value in metrics.items():
        is_small = key in counts and (not isinstance(value, int | float) or math.isnan(value) or 0 < value < min_cell)
        if is_small:
            suppressed.append(key)
        else:
            kept[key] = value
    return kept, suppressed
