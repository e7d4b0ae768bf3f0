"""The local CA (infra/local/certs.py): chains, SANs, caching, revocation into the CRL."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from infra.local.certs import BRIDGE_CN, CertificateError, LocalCA


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "ca")


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_device_cert_chains_to_ca_with_gateway_id_as_cn(ca: LocalCA) -> None:
    ident = ca.device_identity("gw-00012")
    cert = _load(ident.cert_path)
    ca_cert = _load(ca.cert_path)

    cert.verify_directly_issued_by(ca_cert)
    assert _cn(cert) == "gw-00012"
    assert cert.serial_number == ident.serial
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_private_keys_are_0600_and_match_their_certificates(ca: LocalCA) -> None:
    ident = ca.device_identity("gw-00001")
    for key_path in (ident.key_path, ca.directory / "ca.key", ca.server_identity().key_path):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), password=None)
    assert key.public_key() == _load(ident.cert_path).public_key()


def test_server_cert_has_localhost_and_loopback_sans(ca: LocalCA) -> None:
    cert = _load(ca.server_identity().cert_path)
    cert.verify_directly_issued_by(_load(ca.cert_path))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]


def test_certificates_are_cached_on_disk_and_renewable(ca: LocalCA, tmp_path: Path) -> None:
    first = ca.device_identity("gw-00002")
    assert ca.device_identity("gw-00002") == first

    reopened = LocalCA.load_or_create(tmp_path / "ca")
    assert reopened.certificate == ca.certificate
    assert reopened.device_identity("gw-00002") == first

    renewed = ca.device_identity("gw-00002", renew=True)
    assert renewed.serial != first.serial


def test_bridge_identity_has_its_reserved_cn(ca: LocalCA) -> None:
    assert _cn(_load(ca.bridge_identity().cert_path)) == BRIDGE_CN
    with pytest.raises(CertificateError):
        ca.device_identity(BRIDGE_CN)


# "gw-1\n" (a newline): `re.match` with `$` took a trailing newline (found by a review).
@pytest.mark.parametrize("name", ["", "gw/1", "gw+", "gw#", "../x", "gw 1", "a" * 65, "gw-1\n"])
def test_names_that_would_widen_topic_acls_are_refused(ca: LocalCA, name: str) -> None:
    with pytest.raises(CertificateError):
        ca.device_identity(name)


def test_revocation_lands_in_the_signed_crl(ca: LocalCA, tmp_path: Path) -> None:
    ca_cert = _load(ca.cert_path)
    kept = ca.device_identity("gw-00003")
    revoked = ca.device_identity("gw-00004")
    empty = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert empty.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert len(empty) == 0

    assert ca.revoke("gw-00004") == revoked.serial
    assert ca.revoke("gw-00004") == revoked.serial  # idempotent

    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.serial) is None
    assert len(crl) == 1
    assert LocalCA.load_or_create(tmp_path / "ca").revoked_serials() == {revoked.serial}

    with pytest.raises(CertificateError):
        ca.revoke("gw-never-issued")


def test_revoking_a_name_revokes_the_certificates_it_was_renewed_from(ca: LocalCA) -> None:
    """A renewal replaces the cached certificate and left the earlier one valid: rotating a
    leaked key and then revoking the device left the leaked key able to connect (found by a
    review). Revoking a name revokes every certificate issued to it."""
    leaked = ca.device_identity("gw-00005")
    current = ca.device_identity("gw-00005", renew=True)
    other = ca.device_identity("gw-00006")
    assert current.serial != leaked.serial
    assert ca.revoke("gw-00005") == current.serial
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(leaked.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(current.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(other.serial) is None


def test_device_keys_are_ec_p256_signed_by_the_ca_with_sha256(ca: LocalCA) -> None:
    # P-256 keys issue at ~1,500 certificates/s on 2 cores: a fleet's worth in seconds, where
    # RSA-4096 would take minutes (and IoT Core accepts both).
    ident = ca.device_identity("gw-p256")
    cert = x509.load_pem_x509_certificate(ident.cert_path.read_bytes())
    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(ca.certificate)
