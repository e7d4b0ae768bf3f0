"""Local certificate authority for the device → broker leg of the local platform.

In AWS, IoT Core is the broker and every gateway gets its certificate from
``CreateKeysAndCertificate``; locally, Mosquitto is the broker and this module plays
both parts: it creates a CA, the broker's server certificate, one client certificate per
gateway (CN = gateway id, which the broker turns into the MQTT username and client id) and
the rule bridge's identity, and it revokes certificates into a CRL that Mosquitto reads
(``crlfile``).

Everything lives under one directory and is reused across runs::

    ca.key ca.crt crl.pem revoked.json
    server.key server.crt
    clients/<name>.key clients/<name>.crt

Keys are EC P-256 (Mosquitto/OpenSSL and awscrt/s2n both accept them, and generating one
takes well under a millisecond, where RSA-2048 takes tens), written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BRIDGE_CN = "citypulse-rule-bridge"
SERVER_CN = "localhost"

# The CN becomes the MQTT username and client id, and is substituted into ACL patterns
# (`citypulse/telemetry/+/%u`): MQTT wildcards or separators in it would widen the ACL.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_CA_VALIDITY = dt.timedelta(days=3650)
_LEAF_VALIDITY = dt.timedelta(days=825)
_CRL_VALIDITY = dt.timedelta(days=365)
# Renew the CRL well before OpenSSL starts rejecting every handshake with "CRL has expired".
_CRL_RENEW_BEFORE = dt.timedelta(days=30)
# Tolerate a little clock skew between issuing and the first handshake.
_BACKDATE = dt.timedelta(minutes=5)


class CertificateError(Exception):
    """A name cannot be used as a certificate identity, or a revocation has nothing to revoke."""


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key on disk, as TLS clients and servers load them."""

    name: str
    cert_path: Path
    key_path: Path
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Created with `mode` from the start (not chmod-ed after), so a key is never world-readable,
    # and renamed into place so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


_UNUSED_KEY_USAGES = (
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only: a CA also signs certificates and CRLs; every other usage is off."""
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, **dict.fromkeys(_UNUSED_KEY_USAGES, False)
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validate_name(name: str) -> None:
    # The whole name: `match` with `$` let "gw-001\n" through (found by a review).
    if not _NAME_RE.fullmatch(name):
        raise CertificateError(
            f"invalid certificate name {name!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )


class LocalCA:
    """A file-backed CA: issues, caches and revokes the local platform's certificates.

    Safe to use from several processes at once on the same directory: issuing and revoking
    take an exclusive lock on ``<dir>/.lock``.
    """

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self._cert = cert
        self._clients_dir = directory / "clients"

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path, common_name: str = "citypulse local CA") -> LocalCA:
        """Open the CA in ``directory``, creating the directory, key, certificate and CRL if absent."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "clients").mkdir(exist_ok=True)
        with _locked(directory):
            key_path, cert_path = directory / "ca.key", directory / "ca.crt"
            if cert_path.exists() and key_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise CertificateError(f"{key_path} is not an EC key")
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            else:
                key = ec.generate_private_key(ec.SECP256R1())
                now = _now()
                subject = x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "citypulse"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
                cert = (
                    x509.CertificateBuilder()
                    .subject_name(subject)
                    .issuer_name(subject)
                    .public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - _BACKDATE)
                    .not_valid_after(now + _CA_VALIDITY)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(_key_usage(ca=True), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256())
                )
                _write_private(key_path, _key_pem(key))
                _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            ca = cls(directory, key, cert)
            ca._refresh_crl_if_stale()
            return ca

    # -- paths ------------------------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        """The CA certificate (PEM): the trust anchor for the broker and every client."""
        return self.directory / "ca.crt"

    @property
    def crl_path(self) -> Path:
        """The CRL (PEM) for Mosquitto's ``crlfile``; always present, possibly empty."""
        return self.directory / "crl.pem"

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    # -- issuing ----------------------------------------------------------------------------

    def server_identity(
        self,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
    ) -> Identity:
        """The broker's certificate, issued once and reused while it covers the requested SANs.

        Clients verify the host they dial against these SANs (awscrt fails a mismatch only
        after a ~25 s handshake timeout, so getting them right matters).
        """
        key_path, cert_path = self.directory / "server.key", self.directory / "server.crt"
        wanted_dns = set(dns_names)
        wanted_ips = {ipaddress.ip_address(a) for a in ip_addresses}
        with _locked(self.directory):
            cached = self._load_cached(SERVER_CN, cert_path, key_path)
            if cached is not None:
                san = (
                    x509.load_pem_x509_certificate(cert_path.read_bytes())
                    .extensions.get_extension_for_class(x509.SubjectAlternativeName)
                    .value
                )
                if wanted_dns <= set(san.get_values_for_type(x509.DNSName)) and wanted_ips <= set(
                    san.get_values_for_type(x509.IPAddress)
                ):
                    return cached
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
            sans += [x509.IPAddress(ip) for ip in wanted_ips]
            return self._issue(
                SERVER_CN,
                cert_path,
                key_path,
                ExtendedKeyUsageOID.SERVER_AUTH,
                x509.SubjectAlternativeName(sans),
            )

    def client_identity(self, name: str, *, renew: bool = False) -> Identity:
        """The client certificate with CN ``name``, issued on first use and cached on disk.

        ``renew=True`` issues a fresh key and certificate even if one is cached (e.g. after
        revoking the old one).
        """
        _validate_name(name)
        key_path, cert_path = self._clients_dir / f"{name}.key", self._clients_dir / f"{name}.crt"
        with _locked(self.directory):
            if not renew:
                cached = self._load_cached(name, cert_path, key_path)
                if cached is not None:
                    return cached
            return self._issue(name, cert_path, key_path, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def device_identity(self, gateway_id: str, *, renew: bool = False) -> Identity:
        """A gateway's client certificate (CN = gateway id = MQTT client id and username)."""
        if gateway_id == BRIDGE_CN:
            raise CertificateError(f"{BRIDGE_CN!r} is reserved for the rule bridge")
        return self.client_identity(gateway_id, renew=renew)

    def bridge_identity(self) -> Identity:
        """The rule bridge's client certificate (CN ``citypulse-rule-bridge``)."""
        return self.client_identity(BRIDGE_CN)

    # -- revocation -------------------------------------------------------------------------

    def revoke(self, name: str) -> int:
        """Revoke every certificate issued for ``name`` and rewrite the CRL; returns the serial
        of the current one.

        Every one: a renewal (``renew=True``, or near expiry) replaces the cached certificate
        but leaves the earlier ones valid, so revoking only the current one left a leaked key,
        rotated away, still able to connect (found by a review). The CA knows them from
        ``issued.json``, kept since 2026-12-07: a certificate renewed away before then is not
        known and stays valid until it expires. Mosquitto reads ``crlfile`` when its listener
        starts, so a running broker must be restarted to enforce it.
        """
        _validate_name(name)
        cert_path = self._clients_dir / f"{name}.crt"
        with _locked(self.directory):
            if not cert_path.exists():
                raise CertificateError(f"no certificate issued for {name!r}")
            serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
            serials = {serial, *(int(s) for s in self._issued().get(name, ()))}
            revoked = self._revoked()
            known = {r["serial"] for r in revoked}
            now = _now().isoformat()
            revoked += [
                {"serial": str(s), "name": name, "revoked_at": now} for s in sorted(serials) if str(s) not in known
            ]
            _write_public(self.directory / "revoked.json", orjson.dumps(revoked, option=orjson.OPT_INDENT_2))
            self._write_crl(revoked)
            return serial

    def revoked_serials(self) -> set[int]:
        """Serial numbers currently in the CRL."""
        return {int(r["serial"]) for r in self._revoked()}

    # -- internals --------------------------------------------------------------------------

    def _load_cached(self, name: str, cert_path: Path, key_path: Path) -> Identity | None:
        if not (cert_path.exists() and key_path.exists()):
            return None
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc - _now() < dt.timedelta(days=1):
            return None
        return Identity(name=name, cert_path=cert_path, key_path=key_path, serial=cert.serial_number)

    def _issue(
        self,
        name: str,
        cert_path: Path,
        key_path: Path,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None,
    ) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "citypulse"),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + _LEAF_VALIDITY, self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        # Every serial issued to a name, before the certificate exists: revoke takes them all.
        issued = self._issued()
        issued.setdefault(name, []).append(str(serial))
        _write_public(self.directory / "issued.json", orjson.dumps(issued, option=orjson.OPT_INDENT_2))
        # Key first, certificate last: a certificate on disk implies its key is complete.
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return Identity(name=name, cert_path=cert_path, key_path=key_path, serial=serial)

    def _issued(self) -> dict[str, list[str]]:
        path = self.directory / "issued.json"
        return orjson.loads(path.read_bytes()) if path.exists() else {}

    def _revoked(self) -> list[dict[str, str]]:
        path = self.directory / "revoked.json"
        return orjson.loads(path.read_bytes()) if path.exists() else []

    def _write_crl(self, revoked: list[dict[str, str]]) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + _CRL_VALIDITY)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for r in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(r["serial"]))
                .revocation_date(dt.datetime.fromisoformat(r["revoked_at"]))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def _refresh_crl_if_stale(self) -> None:
        if self.crl_path.exists():
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            if crl.next_update_utc is not None and crl.next_update_utc - _now() > _CRL_RENEW_BEFORE:
                return
        self._write_crl(self._revoked())


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # An OS-level lock, so two processes issuing the same gateway's certificate cannot
    # interleave and leave a key that does not match its certificate.
    with open(directory / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
