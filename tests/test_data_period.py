"""The calendar period a site's training data cover leaves trimmed and coarsened under the cell floor."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from federation.contract.protocol import SiteAnswer, SiteStatus
from site_node.governance.data_period import data_period
from site_node.governance.policy import SitePolicy


def _seconds(*days: str) -> np.ndarray:
    return np.array([dt.datetime.fromisoformat(d).replace(tzinfo=dt.UTC).timestamp() for d in days])


def test_the_period_runs_from_the_kth_earliest_to_the_kth_latest_month_so_the_edge_patients_are_not_located():
    # one early outlier (1999) and one late (2031) patient: with a floor of 2 neither date may show
    dates = _seconds("1999-06-01", "2016-03-14", "2017-01-01", "2020-07-31", "2024-11-30", "2031-01-01")
    assert data_period(dates, 2) == "2016-03/2024-11"
    assert data_period(dates, 1) == "1999-06/2031-01"
    assert data_period(dates[::-1], 2) == "2016-03/2024-11"  # order does not matter


def test_fewer_than_twice_the_floor_gives_no_period():
    dates = _seconds(*(f"2020-0{m}-01" for m in range(1, 10)))
    assert data_period(dates, 5) is None  # 9 < 10
    assert data_period(dates, 4) == "2020-04/2020-06"
    assert data_period(None, 5) is None and data_period(np.array([]), 1) is None
    assert data_period(np.array([np.nan, *dates]), 4) == "2020-04/2020-06"  # an undated example counts for nothing


def test_a_period_on_the_wire_must_be_two_iso_months_and_the_policy_can_turn_it_off():
    SiteAnswer(site_id="a", status=SiteStatus.TRAINED, data_period="2016-03/2024-11")
    with pytest.raises(ValueError, match="data_period"):
        SiteAnswer(site_id="a", status=SiteStatus.TRAINED, data_period="2016-03-14/2024-11-30")
    assert SitePolicy().disclose_data_period is True
    assert SitePolicy(disclose_data_period=False).disclose_data_period is False


@pytest.mark.parametrize("disclose", [True, False])
def test_a_site_sends_its_training_period_with_the_update_and_audits_it_unless_its_policy_says_not(
    disclose, prepared_site, tmp_path
):
    from federation.contract import study_hash
    from site_node.config import load_site_config
    from site_node.participation import SiteNode
    from tests.site_helpers import fresh_site, initial_state, instruction, study

    spec = study(training={"rounds": 1})
    node = SiteNode(load_site_config(fresh_site(prepared_site, tmp_path / "site", disclose_data_period=disclose)))
    digest = study_hash(spec)
    node.governance.approvals.approve(digest, spec.study.id, "test steward")
    trained = node.train(instruction(spec), initial_state(spec, node.feature_count(spec)))
    assert trained.answer.status == SiteStatus.TRAINED, trained.answer.reason
    entry = node.governance.audit.entries("round-trained")[-1]
    if not disclose:
        assert trained.answer.data_period is None and entry.payload["left_the_site"]["data_period"] is None
        return
    # checked against the training patients' own index dates, sorted here by hand
    dataset = node.dataset(spec, digest)
    months = sorted(
        dt.datetime.fromtimestamp(s, dt.UTC).strftime("%Y-%m") for s in dataset.index_s[dataset.split == "train"]
    )
    floor = node.policy.min_cell_count
    assert trained.answer.data_period == f"{months[floor - 1]}/{months[-floor]}"
    assert entry.payload["left_the_site"]["data_period"] == trained.answer.data_period
