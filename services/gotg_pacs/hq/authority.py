"""HQ's root certificate authority: vouches for each site's own CA, so a tablet or laptop that
trusts HQ's root once (installed by HQ IT before it ships) trusts every clinic it is carried to.

HQ signs the site CA's existing key (the site's `pacs tls csr`); the site's keys never leave the
box. The signed site CA may sign only end certificates (path length 0) and is named by HQ, not
by the request. Its lifetime is the site CA's own (ten years): a box offline for years must not
lose its tablets' trust. The trade-off: a stolen box's CA stays trusted by HQ-managed devices
until they drop HQ's root or HQ rotates it; its sync credential, by contrast, is revoked at once
(`pacs hq site revoke`).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .. import durable
from ..web.tls import (
    CA_DAYS,
    ORGANIZATION,
    TLSError,
    ca_builder,
    cert_pem,
    fingerprint,
    key_pem,
    load_key,
    new_key,
    site_ca_name,
)

ROOT_DAYS = 20 * 365


class Authority:
    """HQ's root CA in one folder (root only: the key is 0600)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key_file = folder / "root.key"
        self.cert_file = folder / "root.crt"

    def root(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        except FileNotFoundError:
            raise TLSError("HQ has no root CA yet: `pacs hq tls init` makes one") from None

    def init(self) -> tuple[bool, str]:
        """Make the root once; (created, its fingerprint)."""
        if self.key_file.exists():
            return False, fingerprint(self.root())
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                          x509.NameAttribute(NameOID.COMMON_NAME, "GOTG PACS HQ root CA")])
        cert = ca_builder(name, name, key.public_key(), ROOT_DAYS, path_length=1).sign(
            key, hashes.SHA256())
        durable.replace_text(self.key_file, key_pem(key), mode=0o600)
        durable.replace_text(self.cert_file, cert_pem(cert), mode=0o644)
        return True, fingerprint(cert)

    def sign_site(self, csr_pem: str, site_code: str) -> str:
        """The site CA signed by HQ, then HQ's root: the chain `pacs tls install-ca` takes."""
        root = self.root()
        try:
            request = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise TLSError(f"not a PEM certificate signing request: {exc}") from None
        if not request.is_signature_valid:
            raise TLSError("the request's signature does not match its key")
        public_key = request.public_key()
        if not (isinstance(public_key, ec.EllipticCurvePublicKey)
                or (isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048)):
            raise TLSError("the request's key is neither EC nor RSA of 2048 bits or more")
        key = load_key(self.key_file)
        cert = ca_builder(site_ca_name(site_code), root.subject, public_key, CA_DAYS,
                          path_length=0).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False).sign(key, hashes.SHA256())
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature) as exc:  # pragma: no cover - a bug
            raise TLSError(f"the signature made does not verify: {exc}") from None
        return cert_pem(cert) + cert_pem(root)
