"""Site folders for a simulated consortium (`twinfed study simulate`): many site nodes over few OMOP databases.

Each simulated site is a real site folder, the same as `twinfed site init` writes: its own site file,
policy, governance database (approvals, privacy ledger, audit log) and its own secret, derived from
the secret of the hospital whose OMOP database it reads. The derived secret gives each simulated site
its own train/test split key, so sites that share a database still behave as different hospitals do
for the governance layer; they see the same patients, so a simulation measures coordination time and
memory, not model quality. Each site approves the study through the same governance calls as
`twinfed site approve`, recorded in its audit log as an approval by "simulation".

The coordinator never imports this package, so it runs this module as a process:
`python -m site_node.simulated_sites SITES_DIR --study STUDY --sites N --hospital URL SECRET ...`; `--study` may
be repeated (every site approves every study given: the variants of a leave-one-site-out simulation).
It writes SITES_DIR/sites.yaml, the list of site files in partition order that the ClientApp reads
(run-config key `simulation-sites`) to know which site a virtual node of Flower's simulation is.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from federation.contract import load_study, study_hash
from omop_etl.identity import load_or_create_secret
from site_node.config import load_site_config, write_site_folder
from site_node.governance import SitePolicy, load_policy
from site_node.participation import SiteNode

SITE_LIST_FILE = "sites.yaml"
APPROVED_BY = "simulation"


@dataclass(frozen=True)
class Hospital:
    """An OMOP database loaded by `twinfed etl` and the secret it was loaded with."""

    omop_url: str
    secret_file: Path


def site_id(index: int, count: int) -> str:
    """sim-001, sim-002, ...: sortable ids, numbered from 1 like the partitions are from 0."""
    return f"sim-{index + 1:0{max(3, len(str(count)))}d}"


def derive_secret(hospital_secret: Path, site: str) -> bytes:
    """A per-site secret keyed by the hospital's: reproducible across runs, distinct for every site."""
    secret, _ = load_or_create_secret(hospital_secret, create=False)
    return hmac.new(secret, f"twinfed simulated site {site}".encode(), hashlib.sha256).digest()


def _write_secret(path: Path, secret: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(secret.hex() + "\n")


def write_site(folder: Path, site: str, hospital: Hospital, policy: SitePolicy) -> Path:
    """One site folder in the layout `twinfed site init` writes; returns its site file."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_secret(folder / "site.secret", derive_secret(hospital.secret_file, site))
    return write_site_folder(
        folder,
        site,
        hospital.omop_url,
        "site.secret",
        policy.model_dump(mode="json"),
        name=f"simulated site {site} (OMOP {hospital.omop_url})",
    )


def approve(site_file: Path, study: Path, note: str) -> str:
    """The site approves the study by its hash, after the same policy check as `twinfed site approve`."""
    node = SiteNode(load_site_config(site_file))
    spec = load_study(study)
    problems = node.policy_conflicts(spec)
    if problems:
        raise ValueError(f"{node.config.site_id}: the policy refuses {spec.study.id}: " + "; ".join(problems))
    digest = study_hash(spec)
    approval = node.governance.approvals.approve(digest, spec.study.id, APPROVED_BY, note)
    node.governance.audit.append(
        "approved", {"study_hash": digest, "study_id": spec.study.id, "by": approval.approved_by, "note": note}
    )
    return digest


def prepare_sites(
    sites_dir: Path,
    study: Path | list[Path],
    count: int,
    hospitals: list[Hospital],
    policy: SitePolicy | None = None,
) -> Path:
    """`count` site folders under `sites_dir`, hospitals assigned round-robin, each approving every study in
    `study` (one file or several); returns the site list."""
    if not hospitals:
        raise ValueError("a simulation needs at least one OMOP database")
    studies = [study] if isinstance(study, Path) else list(study)
    if not studies:
        raise ValueError("a simulation needs a study to approve")
    policy = policy or SitePolicy()
    files = []
    for index in range(count):
        site = site_id(index, count)
        site_file = write_site(sites_dir / site, site, hospitals[index % len(hospitals)], policy)
        for path in studies:
            approve(site_file, path, f"twinfed study simulate: {count} simulated sites")
        files.append(str(site_file.resolve()))
    listing = sites_dir / SITE_LIST_FILE
    listing.write_text(yaml.safe_dump(files), encoding="utf-8")
    return listing


@lru_cache(maxsize=8)
def _site_files(listing: str) -> tuple[str, ...]:
    files = yaml.safe_load(Path(listing).read_text(encoding="utf-8"))
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{listing}: a simulation's site list is a YAML list of site file paths")
    return tuple(files)


def site_file_for_partition(listing: str, partition_id: int) -> str:
    """The site file of a simulated node: entry `partition_id` of the site list."""
    files = _site_files(listing)
    if not 0 <= partition_id < len(files):
        raise ValueError(
            f"{listing} lists {len(files)} sites; simulated node partition {partition_id} has none "
            "(run the simulation with as many supernodes as sites)"
        )
    return files[partition_id]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_node.simulated_sites", description=__doc__.split("\n")[0])
    parser.add_argument("sites_dir", type=Path, help="folder for the simulated site folders")
    parser.add_argument(
        "--study", type=Path, action="append", required=True,
        help="a study file every site approves (repeatable: each site approves each)",
    )  # fmt: skip
    parser.add_argument("--sites", type=int, required=True, help="how many simulated sites")
    parser.add_argument(
        "--hospital", nargs=2, action="append", required=True, metavar=("OMOP_URL", "SECRET_FILE"),
        help="an OMOP database loaded by `twinfed etl` and its secret file (repeatable)",
    )  # fmt: skip
    parser.add_argument("--policy", type=Path, help="policy file for every site (default: the default policy)")
    args = parser.parse_args(argv)
    hospitals = [Hospital(url, Path(secret).resolve()) for url, secret in args.hospital]
    try:
        policy = load_policy(args.policy) if args.policy else None
        listing = prepare_sites(args.sites_dir, args.study, args.sites, hospitals, policy)
    except Exception as exc:  # one readable line for the coordinator's simulate command
        print(f"cannot prepare the simulated sites: {exc}", file=sys.stderr)
        return 1
    print(listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
