"""Consortium key provisioning: a CA that signs the SuperLink certificate for the right names, private keys
nobody else can read, site keys in the format Flower loads, and no key ever silently re-issued."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from federation.common.keys import ProvisionError, ssh_fingerprint
from federation.deploy.provision import ConsortiumLayout, add_site, init_consortium, load_consortium
from site_node.keys import SiteKeyError, generate_site_keys, load_site_private_key
from twinfed.cli import app

runner = CliRunner()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def consortium_dir(tmp_path: Path) -> Path:
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost", "fl.example.org", "10.1.2.3"], ["aster", "birch"])
    return root


def test_init_lays_out_ca_superlink_and_site_bundles(consortium_dir: Path):
    layout = ConsortiumLayout(consortium_dir)
    assert set(_files(consortium_dir)) == {
        "consortium.yaml",
        "ca/ca.key",
        "ca/ca.crt",
        "superlink/server.key",
        "superlink/server.pem",
        "superlink/ca.crt",
        "sites/aster/aster.key",
        "sites/aster/aster.pub",
        "sites/aster/ca.crt",
        "sites/birch/birch.key",
        "sites/birch/birch.pub",
        "sites/birch/ca.crt",
    }
    for private in (layout.ca_key, layout.server_key, layout.site_key("aster"), layout.site_key("birch")):
        assert _mode(private) == 0o600, private
    for copy in (layout.superlink_ca, layout.site_ca("aster"), layout.site_ca("birch")):
        assert copy.read_bytes() == layout.ca_cert.read_bytes()


def test_server_certificate_is_signed_by_the_ca_and_names_every_host(consortium_dir: Path):
    layout = ConsortiumLayout(consortium_dir)
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    # IPs are IP entries (TLS clients never match an address against a DNS entry); loopback is always added
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    # the private key really belongs to the certificate
    key = serialization.load_pem_private_key(layout.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_site_keys_are_openssh_p384_as_flower_loads_them(consortium_dir: Path):
    layout = ConsortiumLayout(consortium_dir)
    consortium = load_consortium(consortium_dir)
    for site in consortium.sites:
        private = serialization.load_ssh_private_key(layout.site_key(site.id).read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert layout.site_key(site.id).read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        # Flower's own `flwr supernode register` loader accepts the .pub file
        assert try_load_public_key(layout.site_public_key(site.id))
        public = serialization.load_ssh_public_key(layout.site_public_key(site.id).read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert site.fingerprint == ssh_fingerprint(private.public_key())
        assert site.public_key == layout.site_public_key(site.id).read_text().strip()
        assert site.key_origin == "issued"
    assert consortium.superlink.hosts == ["localhost", "fl.example.org", "10.1.2.3", "127.0.0.1"]


def test_init_refuses_an_existing_consortium_and_changes_nothing(consortium_dir: Path):
    before = _files(consortium_dir)
    with pytest.raises(ProvisionError, match=r"consortium\.yaml already exists; refusing to overwrite"):
        init_consortium(consortium_dir, ["localhost"], ["aster"])
    assert _files(consortium_dir) == before


def test_init_refuses_bad_input_before_writing(tmp_path: Path):
    with pytest.raises(ProvisionError, match="neither an IP address nor a DNS name"):
        init_consortium(tmp_path / "a", ["bad host!"], [])
    with pytest.raises(ProvisionError, match="site id 'Aster Hospital' is not valid"):
        init_consortium(tmp_path / "b", ["localhost"], ["Aster Hospital"])
    with pytest.raises(ProvisionError, match="the same --site is given twice"):
        init_consortium(tmp_path / "c", ["localhost"], ["aster", "aster"])
    with pytest.raises(ProvisionError, match="name at least one --host"):
        init_consortium(tmp_path / "d", [], [])
    assert not any(tmp_path.rglob("*.key"))


def test_add_site_issues_only_that_sites_files(consortium_dir: Path):
    before = _files(consortium_dir)
    issued = add_site(consortium_dir, "cedar")
    after = _files(consortium_dir)
    assert set(after) - set(before) == {"sites/cedar/cedar.key", "sites/cedar/cedar.pub", "sites/cedar/ca.crt"}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"consortium.yaml"}
    assert _mode(ConsortiumLayout(consortium_dir).site_key("cedar")) == 0o600
    assert issued.private_key == ConsortiumLayout(consortium_dir).site_key("cedar")
    assert [s.id for s in load_consortium(consortium_dir).sites] == ["aster", "birch", "cedar"]


def test_add_site_refuses_duplicates_and_existing_files(consortium_dir: Path):
    before = _files(consortium_dir)
    with pytest.raises(ProvisionError, match=r"site birch is already in .*consortium\.yaml; refusing"):
        add_site(consortium_dir, "birch")
    stray = ConsortiumLayout(consortium_dir).site_public_key("dogwood")
    stray.parent.mkdir()
    stray.write_text("left over\n")
    with pytest.raises(ProvisionError, match=rf"{stray} already exists; refusing to overwrite"):
        add_site(consortium_dir, "dogwood")
    assert _files(consortium_dir) == {**before, "sites/dogwood/dogwood.pub": b"left over\n"}


def test_add_site_with_the_sites_own_public_key_never_sees_a_private_key(consortium_dir: Path, tmp_path: Path):
    keys = generate_site_keys(tmp_path / "at-the-hospital", "elm")
    assert _mode(keys.private_key) == 0o600
    issued = add_site(consortium_dir, "elm", keys.public_key)
    assert issued.private_key is None
    assert sorted(p.name for p in issued.folder.iterdir()) == ["ca.crt", "elm.pub"]
    entry = load_consortium(consortium_dir).site("elm")
    assert entry is not None and entry.key_origin == "site-generated"
    assert entry.fingerprint == keys.fingerprint
    assert load_site_private_key(keys.private_key)  # the key the SuperNode will use loads

    with pytest.raises(ProvisionError, match=r"is the key of site elm already"):
        add_site(consortium_dir, "fir", keys.public_key)
    with pytest.raises(SiteKeyError, match=r"elm\.key already exists; refusing to overwrite"):
        generate_site_keys(tmp_path / "at-the-hospital", "elm")


def test_add_site_refuses_keys_flower_would_refuse(consortium_dir: Path, tmp_path: Path):
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ProvisionError, match=rf"{ed} is not an ECDSA key on a NIST curve"):
        add_site(consortium_dir, "fir", ed)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(ProvisionError, match=rf"{garbage} is not an OpenSSH public key"):
        add_site(consortium_dir, "fir", garbage)
    with pytest.raises(ProvisionError, match=r"missing\.pub does not exist"):
        add_site(consortium_dir, "fir", tmp_path / "missing.pub")
    assert load_consortium(consortium_dir).site("fir") is None


def test_add_site_needs_a_consortium(tmp_path: Path):
    with pytest.raises(ProvisionError, match=r"consortium\.yaml does not exist: .* is not a consortium folder"):
        add_site(tmp_path, "aster")


def test_a_tampered_registry_is_refused_naming_the_file(consortium_dir: Path):
    path = ConsortiumLayout(consortium_dir).registry
    data = yaml.safe_load(path.read_text())
    data["sites"][0]["fingerprint"] = data["sites"][1]["fingerprint"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProvisionError, match=rf"{path}: the consortium registry is not valid: .*does not match"):
        load_consortium(consortium_dir)


def test_exposed_or_foreign_site_keys_are_refused(consortium_dir: Path, tmp_path: Path):
    key = ConsortiumLayout(consortium_dir).site_key("aster")
    key.chmod(0o644)
    with pytest.raises(SiteKeyError, match=rf"{key} can be read by other users \(mode 0644\).*chmod 600"):
        load_site_private_key(key)
    pem = tmp_path / "pem.key"
    pem.write_bytes(ConsortiumLayout(consortium_dir).server_key.read_bytes())
    pem.chmod(0o600)
    with pytest.raises(SiteKeyError, match="is not an unencrypted OpenSSH private key"):
        load_site_private_key(pem)
    with pytest.raises(SiteKeyError, match=r"nope\.key does not exist"):
        load_site_private_key(tmp_path / "nope.key")


def test_provision_commands(tmp_path: Path):
    root = tmp_path / "c"
    result = runner.invoke(app, ["provision", "init", str(root), "--host", "127.0.0.1", "--host", "localhost",
                                 "--site", "aster"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Consortium 'twinfed consortium' created" in result.output
    fingerprint = load_consortium(root).site("aster").fingerprint
    assert fingerprint in result.output  # shown whole, for comparing with the hospital

    result = runner.invoke(app, ["provision", "init", str(root), "--host", "localhost"])
    assert result.exit_code == 1 and "already exists; refusing to overwrite" in result.output

    result = runner.invoke(app, ["site", "keygen", str(tmp_path / "h"), "--site-id", "birch"])
    assert result.exit_code == 0, result.output
    public = tmp_path / "h" / "birch.pub"
    result = runner.invoke(app, ["provision", "add-site", str(root), "birch", "--public-key", str(public)])
    assert result.exit_code == 0, result.output
    assert "The private key stays at the hospital" in result.output
    result = runner.invoke(app, ["provision", "add-site", str(root), "birch"])
    assert result.exit_code == 1 and "site birch is already in" in result.output
    result = runner.invoke(app, ["site", "keygen", str(tmp_path / "h"), "--site-id", "birch"])
    assert result.exit_code == 1 and "already exists; refusing to overwrite a site key" in result.output

    result = runner.invoke(app, ["provision", "show", str(root)])
    assert result.exit_code == 0 and "aster" in result.output and "birch" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["provision"],
        ["provision", "init"],
        ["provision", "add-site"],
        ["provision", "show"],
        ["coordinator", "start"],
        ["coordinator", "register-site"],
        ["site", "start"],
        ["site", "keygen"],
    ],
)
def test_deployment_commands_have_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
