"""The privacy ledger on SQLite and PostgreSQL: Opacus epsilon across rounds, refusals at the study and site
ceilings, and a site node killed mid-round that neither under-counts nor double-spends on retry."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from site_node.governance import (
    BudgetRefused,
    GovernanceStore,
    LedgerError,
    PrivacyEvent,
    PrivacyLedger,
    RoundAlreadyTrained,
    SitePolicy,
)

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
ROUND = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=40)


@pytest.fixture
def store(backend):
    url, schema = backend
    opened = GovernanceStore(url, schema=schema)
    yield opened
    opened.dispose()


def opacus_epsilon(history: list[tuple[float, float, int]], accountant: str = "rdp", delta: float = DELTA) -> float:
    engine = create_accountant(accountant)
    engine.history = history
    return engine.get_epsilon(delta)


def test_rounds_reserved_and_committed_compose_like_one_accountant(store):
    ledger = PrivacyLedger(store, SitePolicy())
    for i in range(3):
        reservation = ledger.reserve("study-a", f"r{i}", ROUND, DELTA, "rdp", 10.0)
        assert reservation.status == "reserved"
        ledger.commit(reservation)
    expected = opacus_epsilon([(1.0, 0.05, 120)])
    assert ledger.spent("study-a") == pytest.approx(expected, abs=1e-12)
    assert ledger.history("study-a") == [ROUND] * 3
    assert ledger.site_spent() == pytest.approx(expected, abs=1e-12)
    (budget,) = ledger.summary()
    assert (budget.committed_rounds, budget.reserved_rounds, budget.released_rounds, budget.rounds) == (3, 0, 0, 3)
    assert budget.committed_epsilon == pytest.approx(expected) and budget.reserved_epsilon == 0


def test_the_study_ceiling_refuses_the_round_that_would_cross_it(store):
    ledger = PrivacyLedger(store, SitePolicy())
    three, four = opacus_epsilon([(1.0, 0.05, 120)]), opacus_epsilon([(1.0, 0.05, 160)])
    target = (three + four) / 2
    for i in range(3):
        ledger.commit(ledger.reserve("study-a", f"r{i}", ROUND, DELTA, "rdp", target))
    with pytest.raises(BudgetRefused) as refused:
        ledger.reserve("study-a", "r3", ROUND, DELTA, "rdp", target)
    error = refused.value
    assert error.projected == pytest.approx(four, abs=1e-12)  # computed by Opacus over all four rounds
    assert error.spent == pytest.approx(three, abs=1e-12) and error.limit == pytest.approx(target)
    assert "study privacy ceiling" in error.reason
    assert f"ε={target:.2f}" in error.reason and f"ε={three:.2f}" in error.reason and f"ε={four:.2f}" in error.reason
    assert ledger.spent("study-a") == pytest.approx(three)  # a refusal holds nothing


def test_the_site_policy_caps_a_study_whose_own_target_is_higher(store):
    ceiling = (opacus_epsilon([(1.0, 0.05, 40)]) + opacus_epsilon([(1.0, 0.05, 80)])) / 2
    ledger = PrivacyLedger(store, SitePolicy(study_epsilon_ceiling=ceiling))
    ledger.commit(ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 50.0))
    with pytest.raises(BudgetRefused, match="study_epsilon_ceiling") as refused:
        ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 50.0)
    assert refused.value.limit == pytest.approx(ceiling)


def test_the_site_ceiling_refuses_across_studies(store):
    one, two = opacus_epsilon([(1.0, 0.05, 40)]), opacus_epsilon([(1.0, 0.05, 80)])
    site_ceiling = two + one / 2
    ledger = PrivacyLedger(store, SitePolicy(site_epsilon_ceiling=site_ceiling))
    for i in range(2):
        ledger.commit(ledger.reserve("study-a", f"r{i}", ROUND, DELTA, "rdp", 10.0))
    with pytest.raises(BudgetRefused) as refused:
        ledger.reserve("study-b", "r0", ROUND, DELTA, "rdp", 10.0)
    error = refused.value
    assert "site privacy ceiling" in error.reason and "site_epsilon_ceiling" in error.reason
    assert f"ε={site_ceiling:.2f}" in error.reason
    assert f"spent ε={two:.2f} so far" in error.reason
    assert f"total to ε={two + one:.2f}" in error.reason
    assert error.projected == pytest.approx(two + one, abs=1e-12)
    assert ledger.site_spent() == pytest.approx(two) and ledger.spent("study-b") == 0.0


def test_the_policy_floor_and_delta_cap_refuse_before_any_accounting(store):
    ledger = PrivacyLedger(store, SitePolicy(min_noise_multiplier=0.8, max_delta=1e-6))
    weak = PrivacyEvent(noise_multiplier=0.5, sample_rate=0.05, steps=40)
    with pytest.raises(BudgetRefused, match=r"below this site's privacy floor of 0\.8"):
        ledger.reserve("study-a", "r0", weak, 1e-6, "rdp", 10.0)
    with pytest.raises(BudgetRefused, match=r"delta 1e-05 is above this site's maximum of 1e-06"):
        ledger.reserve("study-a", "r0", ROUND, 1e-5, "rdp", 10.0)
    with pytest.raises(ValueError, match="GDP is not accepted"):
        ledger.reserve("study-a", "r0", ROUND, 1e-6, "gdp", 10.0)
    assert ledger.summary() == []


def test_a_committed_round_is_not_trained_again(store):
    ledger = PrivacyLedger(store, SitePolicy())
    reservation = ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 10.0)
    epsilon = ledger.commit(reservation)
    assert ledger.commit(reservation) == epsilon  # a repeated commit is harmless
    with pytest.raises(RoundAlreadyTrained, match="already trained"):
        ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 10.0)
    with pytest.raises(LedgerError, match="cannot be given back"):
        ledger.release(reservation, "changed our mind")
    assert ledger.spent("study-a") == pytest.approx(opacus_epsilon([(1.0, 0.05, 40)]))


def test_a_released_round_frees_its_budget_and_can_be_reserved_again(store):
    ledger = PrivacyLedger(store, SitePolicy())
    first = ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 10.0)
    ledger.release(first, "the OMOP database was unreachable; no data was read")
    assert ledger.spent("study-a") == 0.0
    with pytest.raises(LedgerError, match="was released"):
        ledger.commit(first)
    second = ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 10.0)
    assert second.id != first.id and second.attempt == 2
    ledger.commit(second)
    (budget,) = ledger.summary()
    assert (budget.committed_rounds, budget.released_rounds) == (1, 1)


def test_commit_records_what_the_round_actually_did(store):
    ledger = PrivacyLedger(store, SitePolicy())
    reservation = ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 10.0)
    actual = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=25)
    assert ledger.commit(reservation, actual) == pytest.approx(opacus_epsilon([(1.0, 0.05, 25)]))
    assert ledger.history("study-a") == [actual]


@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_equals_one_continuous_opacus_training(tmp_path, accountant):
    """Five rounds, each with a freshly built model and PrivacyEngine as the ClientApp does, reserved and
    committed in the ledger, against one PrivacyEngine that trained through all five rounds without a restart.
    (Accounting does not depend on the backend, so SQLite alone.)"""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(200, 4), torch.randint(0, 2, (200,)))
    sigma, rounds = 1.1, 5

    def private(engine: PrivacyEngine):
        model = torch.nn.Linear(4, 2)
        return engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=10),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
        )

    def one_epoch(model, optimizer, loader) -> int:
        steps = 0
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
        return steps

    continuous = PrivacyEngine(accountant=accountant)
    model, optimizer, loader = private(continuous)
    for _ in range(rounds):
        one_epoch(model, optimizer, loader)

    store = GovernanceStore(f"sqlite:///{tmp_path / 'governance.sqlite'}")
    ledger = PrivacyLedger(store, SitePolicy(study_epsilon_ceiling=50, site_epsilon_ceiling=50))
    for r in range(rounds):
        engine = PrivacyEngine(accountant=accountant)
        model, optimizer, loader = private(engine)
        event = PrivacyEvent(noise_multiplier=sigma, sample_rate=loader.sample_rate, steps=len(loader))
        reservation = ledger.reserve("study-a", f"round-{r}", event, DELTA, accountant, 50.0)
        steps = one_epoch(model, optimizer, loader)
        ledger.commit(reservation, PrivacyEvent(sigma, loader.sample_rate, steps))

    assert continuous.accountant.history == [(sigma, 0.05, 100)]
    assert ledger.spent("study-a") == pytest.approx(continuous.get_epsilon(DELTA), abs=1e-9)
    store.dispose()


def _reserve_then_die(url: str, schema: str | None) -> subprocess.CompletedProcess:
    code = (
        "import os, signal\n"
        "from site_node.governance import GovernanceStore, PrivacyEvent, PrivacyLedger, SitePolicy\n"
        f"store = GovernanceStore({url!r}, schema={schema!r})\n"
        "ledger = PrivacyLedger(store, SitePolicy())\n"
        "event = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=40)\n"
        "reservation = ledger.reserve('study-a', 'round-3', event, 1e-5, 'rdp', 10.0)\n"
        "print(reservation.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # mid-round: training would start here\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_kill_9_mid_round_never_under_counts_and_a_retry_counts_once(backend, store):
    url, schema = backend
    ledger = PrivacyLedger(store, SitePolicy())
    for i in range(2):
        ledger.commit(ledger.reserve("study-a", f"round-{i + 1}", ROUND, DELTA, "rdp", 10.0))

    child = _reserve_then_die(url, schema)
    assert child.returncode == -signal.SIGKILL, child.stderr
    reserved_id = int(child.stdout.strip())

    three = opacus_epsilon([(1.0, 0.05, 120)])
    assert ledger.spent("study-a") == pytest.approx(three, abs=1e-12)  # the killed round still counts
    assert ledger.history("study-a") == [ROUND] * 3
    (budget,) = ledger.summary()
    assert (budget.committed_rounds, budget.reserved_rounds) == (2, 1)
    assert budget.reserved_epsilon == pytest.approx(three - opacus_epsilon([(1.0, 0.05, 80)]))

    retry = ledger.reserve("study-a", "round-3", ROUND, DELTA, "rdp", 10.0)
    assert retry.id == reserved_id and retry.status == "reserved"
    assert ledger.spent("study-a") == pytest.approx(three, abs=1e-12)  # the retry did not reserve again
    assert ledger.commit(retry) == pytest.approx(three, abs=1e-12)
    assert ledger.history("study-a") == [ROUND] * 3
    (budget,) = ledger.summary()
    assert (budget.committed_rounds, budget.reserved_rounds) == (3, 0)


def test_a_retry_with_other_parameters_keeps_the_reservation_and_rechecks_the_budget(store):
    ledger = PrivacyLedger(store, SitePolicy())
    first = ledger.reserve("study-a", "r0", ROUND, DELTA, "rdp", 10.0)
    ledger.end_lease(first)  # the attempt that held it is gone (a crash); the retry may take it over
    bigger = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=60)
    again = ledger.reserve("study-a", "r0", bigger, DELTA, "rdp", 10.0)
    assert again.id == first.id and again.event == bigger
    assert ledger.spent("study-a") == pytest.approx(opacus_epsilon([(1.0, 0.05, 60)]))
    ledger.end_lease(again)
    with pytest.raises(BudgetRefused, match="study privacy ceiling"):
        ledger.reserve("study-a", "r0", PrivacyEvent(0.6, 0.5, 2000), DELTA, "rdp", 10.0)
    assert ledger.history("study-a") == [bigger]


def test_concurrent_reservations_never_overshoot_the_site_ceiling(backend, store):
    """Six site-node workers, each with its own connection, reserve a round of six different studies at the
    same moment; the site ceiling has room for three. Without serialisation each would read the others'
    budget as unspent and all six would pass."""
    one = opacus_epsilon([(1.0, 0.05, 40)])
    policy = SitePolicy(site_epsilon_ceiling=one * 3.5)
    workers = 6
    start = threading.Barrier(workers)

    def reserve(n: int) -> str:
        own = GovernanceStore(*backend)
        try:
            ledger = PrivacyLedger(own, policy)
            start.wait(timeout=60)
            ledger.reserve(f"study-{n}", "r0", ROUND, DELTA, "rdp", 10.0)
            return "reserved"
        except BudgetRefused:
            return "refused"
        finally:
            own.dispose()

    with ThreadPoolExecutor(workers) as pool:
        answers = sorted(pool.map(reserve, range(workers)))
    assert answers == ["refused"] * 3 + ["reserved"] * 3
    assert PrivacyLedger(store, policy).site_spent() == pytest.approx(3 * one)
