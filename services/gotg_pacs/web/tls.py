"""The site's own certificate authority and the certificate of its HTTPS origin.

Both are made on the box the first time the web server starts, never in the image: two boxes
flashed from one image share no key (invariant 6). The CA lives ten years and is what a tablet is
asked to trust once; people compare its SHA-256 fingerprint (console, `pacs tls show`) with the
one the tablet shows. The server certificate it signs lives 397 days, the longest browsers
accept, and is reissued at start whenever it nears expiry or the box's names or addresses
changed, so a new DHCP lease never locks clinicians out of the viewer. Keys are ECDSA P-256:
small, fast on a Pi, accepted by every browser in use.

HQ can vouch for a site: `csr()` asks HQ's authority (`hq/authority.py`) to sign the site CA's
key, and `install_ca_chain()` puts the signed CA in place with the same key, so devices that
trust HQ's root trust every site without installing each one.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import durable

CA_DAYS = 3650
SERVER_DAYS = 397       # browsers refuse server certificates valid for longer
RENEW_BEFORE_DAYS = 30  # reissued at the first start inside this window
ORGANIZATION = "Gift of the Givers PACS"
HOUR = datetime.timedelta(hours=1)  # clocks of a box after a power cut may lag: backdate a little


class TLSError(Exception):
    """The site's TLS material cannot be used as it is; the message says what to do."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"{path} is not an EC key")
    return key


def site_ca_name(site_code: str) -> x509.Name:
    """The site CA's name, the same whether it signs itself or HQ signs it."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"GOTG PACS site {site_code} CA"),
    ])


def ca_builder(subject: x509.Name, issuer: x509.Name, public_key, days: int,
               path_length: int | None) -> x509.CertificateBuilder:
    """A certificate authority's certificate, before its issuer signs it."""
    now = _now()
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as browsers and phones show it (AB:CD:...)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def box_names(extra: str = "") -> list[str]:
    """What people type to reach this box: host name, mDNS name, addresses, SERVER_NAMES."""
    host = socket.gethostname().split(".")[0]
    names = [host, f"{host}.local", "localhost", "127.0.0.1", "::1"]
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(address.address.split("%")[0])
            if not ip.is_link_local:
                names.append(str(ip))
    names.extend(extra.split())
    return list(dict.fromkeys(name.lower() for name in names if name))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def names_of(cert: x509.Certificate) -> set[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
            | set(names.get_values_for_type(x509.DNSName)))


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass
class Outcome:
    """What `SiteTLS.ensure` did, for the log and the console."""

    ca_created: bool = False
    server_issued: str = ""   # why the server certificate was (re)issued; empty: kept
    names: list[str] = field(default_factory=list)
    ca_fingerprint: str = ""


class SiteTLS:
    """The files of one site's TLS material in one folder (root only; the keys are 0600)."""

    def __init__(self, folder: Path, site_code: str) -> None:
        self.folder = folder
        self.site_code = site_code
        self.ca_key_file = folder / "ca.key"
        self.ca_cert_file = folder / "ca.crt"          # the site CA (HQ-signed once installed)
        self.ca_chain_file = folder / "ca-chain.crt"   # the site CA and, if any, HQ's root
        self.server_key_file = folder / "server.key"
        self.server_cert_file = folder / "server.crt"  # server certificate + site CA

    # --- reading -----------------------------------------------------------------------------

    def ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_cert_file.read_bytes())

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        return load_key(self.ca_key_file)

    def server_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.server_cert_file.read_bytes())[0]

    # --- making ------------------------------------------------------------------------------

    def _write_key(self, path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        durable.replace_text(path, key_pem(key), mode=0o600)

    def _create_ca(self) -> None:
        key = new_key()
        name = site_ca_name(self.site_code)
        cert = ca_builder(name, name, key.public_key(), CA_DAYS, path_length=0).sign(
            key, hashes.SHA256())
        # The key first: a CA certificate without its key on disk could never sign again.
        self._write_key(self.ca_key_file, key)
        durable.replace_text(self.ca_cert_file, cert_pem(cert), mode=0o644)
        durable.replace_text(self.ca_chain_file, cert_pem(cert), mode=0o644)

    def _issue_server(self, names: list[str]) -> None:
        ca, ca_key = self.ca_cert(), self._ca_key()
        key = new_key()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS) - HOUR)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self._write_key(self.server_key_file, key)
        chain = cert_pem(cert) + self.ca_cert_file.read_text()
        durable.replace_text(self.server_cert_file, chain, mode=0o644)

    def _reissue_reason(self, names: list[str]) -> str:
        if not (self.server_cert_file.exists() and self.server_key_file.exists()):
            return "none yet"
        try:
            cert = self.server_cert()
        except ValueError:
            return "the old one was unreadable"
        if not _signed_by(cert, self.ca_cert()):
            return "the site CA changed"
        if cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_BEFORE_DAYS):
            return f"it expires {cert.not_valid_after_utc:%Y-%m-%d}"
        missing = sorted(set(names) - names_of(cert))
        if missing:
            return "new names: " + ", ".join(missing)
        return ""

    def ensure(self, names: list[str]) -> Outcome:
        """A usable CA and a server certificate covering `names`, made or renewed as needed."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        outcome = Outcome(names=names)
        if not self.ca_key_file.exists():
            if self.ca_cert_file.exists():
                raise TLSError(f"{self.ca_cert_file} is there but its key {self.ca_key_file} is "
                               "missing: restore the key from a backup, or remove both to make "
                               "a new CA (every tablet must then trust the new one)")
            self._create_ca()
            outcome.ca_created = True
        if self.ca_cert().public_key() != self._ca_key().public_key():
            raise TLSError(f"{self.ca_key_file} is not the key of {self.ca_cert_file} (a restore "
                           "cut short?): run the restore again, or put both back from a backup")
        outcome.server_issued = self._reissue_reason(names)
        if outcome.server_issued:
            self._issue_server(names)
        outcome.ca_fingerprint = fingerprint(self.ca_cert())
        return outcome

    def take_ca_from(self, folder: Path) -> str | None:
        """Put back the CA kept in `folder` (a backup's copy of this folder), so the tablets
        that trusted the box it came from trust this one. This box's own CA and certificate
        move to `replaced-TIME/` (kept, never deleted); the server certificate is issued again
        by the next `ensure`. Returns the fingerprint put back, None when it is this CA."""
        kept = SiteTLS(folder, self.site_code)
        try:
            ca, key = kept.ca_cert(), kept._ca_key()
        except (OSError, ValueError) as exc:
            raise TLSError(f"the backup's site CA cannot be read: {exc}") from None
        if ca.public_key() != key.public_key():
            raise TLSError("the backup's site CA certificate is not for its key")
        chain = kept.ca_chain_file if kept.ca_chain_file.exists() else kept.ca_cert_file
        wanted = {self.ca_key_file: (kept.ca_key_file.read_bytes(), 0o600),
                  self.ca_cert_file: (kept.ca_cert_file.read_bytes(), 0o644),
                  self.ca_chain_file: (chain.read_bytes(), 0o644)}
        if all(path.exists() and path.read_bytes() == data
               for path, (data, _) in wanted.items()):
            return None  # this CA already (a restore run again)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        aside = self.folder / f"replaced-{_now():%Y%m%dT%H%M%S}"
        aside.mkdir(mode=0o700, exist_ok=True)
        for path in (*wanted, self.server_key_file, self.server_cert_file):
            if path.exists():  # copied, not moved: a cut restore leaves a CA in place
                durable.replace_bytes(aside / path.name, path.read_bytes(), mode=0o600)
        # Each file replaced whole; one cut between them is found by `ensure` (the key not
        # the certificate's), and running the restore again finishes it.
        for path, (data, mode) in wanted.items():
            durable.replace_bytes(path, data, mode=mode)
        self.server_cert_file.unlink(missing_ok=True)  # issued again from this CA
        self.server_key_file.unlink(missing_ok=True)
        return fingerprint(ca)

    # --- HQ vouching for the site ------------------------------------------------------------

    def csr(self) -> str:
        """A signing request for the site CA's own key, for HQ's authority to sign."""
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(self.ca_cert().subject)
            .sign(self._ca_key(), hashes.SHA256())
        )
        return request.public_bytes(serialization.Encoding.PEM).decode()

    def install_ca_chain(self, pem: str) -> str:
        """Put HQ's signature of the site CA in place (same key); the server certificate is
        reissued at the next start. Returns HQ's root fingerprint."""
        try:
            certs = x509.load_pem_x509_certificates(pem.encode())
        except ValueError as exc:
            raise TLSError(f"not a PEM certificate chain: {exc}") from None
        site = certs[0]
        if site.public_key() != self._ca_key().public_key():
            raise TLSError("this certificate is for another key than this site's CA")
        if site.subject != site_ca_name(self.site_code):
            raise TLSError(f"HQ signed it as {site.subject.rfc4514_string()}, not as site "
                           f"{self.site_code}'s CA: ask HQ to sign it with --site "
                           f"{self.site_code}")
        constraints = site.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise TLSError("HQ signed the site CA as an end certificate, not as a CA")
        root = certs[-1]
        if len(certs) < 2 or not _signed_by(site, root):
            raise TLSError("the chain must hold the site CA followed by the HQ root that "
                           "signed it")
        durable.replace_text(self.ca_cert_file, cert_pem(site), mode=0o644)
        durable.replace_text(self.ca_chain_file, "".join(cert_pem(c) for c in certs),
                             mode=0o644)
        self.server_cert_file.unlink(missing_ok=True)  # reissued under the new chain
        return fingerprint(root)
