"""The site's certificate authority: made once, kept, and the server certificate renewed on its
own when it nears expiry or the box is reached by new names."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store

from gotg_pacs.hq.authority import Authority
from gotg_pacs.web import tls
from gotg_pacs.web.tls import SiteTLS, TLSError

NAMES = ["clinic-box", "clinic-box.local", "localhost", "127.0.0.1", "192.168.1.20"]


def serial(material: SiteTLS) -> int:
    return material.server_cert().serial_number


def test_a_second_start_keeps_the_ca_and_the_certificate(tmp_path):
    material = SiteTLS(tmp_path / "tls", "gaza-east")
    first = material.ensure(NAMES)
    assert first.ca_created and first.server_issued == "none yet"
    before = (material.ca_key_file.read_bytes(), serial(material))
    again = material.ensure(NAMES)
    assert not again.ca_created and again.server_issued == ""
    assert (material.ca_key_file.read_bytes(), serial(material)) == before
    assert again.ca_fingerprint == first.ca_fingerprint
    assert "gaza-east" in material.ca_cert().subject.rfc4514_string()


def test_a_new_address_gets_a_new_certificate_from_the_same_ca(tmp_path):
    material = SiteTLS(tmp_path / "tls", "gaza-east")
    first = material.ensure(NAMES)
    old = serial(material)
    moved = material.ensure([*NAMES[:-1], "10.0.0.5"])
    assert moved.server_issued == "new names: 10.0.0.5"
    assert serial(material) != old and moved.ca_fingerprint == first.ca_fingerprint
    assert "10.0.0.5" in tls.names_of(material.server_cert())
    # an address no longer held is no reason to reissue; only missing ones are
    assert material.ensure(NAMES[:3] + ["10.0.0.5"]).server_issued == ""


def test_a_certificate_near_expiry_is_renewed_at_start(tmp_path, monkeypatch):
    material = SiteTLS(tmp_path / "tls", "gaza-east")
    material.ensure(NAMES)
    old = serial(material)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=tls.SERVER_DAYS - 20)
    monkeypatch.setattr(tls, "_now", lambda: later)
    renewed = material.ensure(NAMES)
    assert renewed.server_issued.startswith("it expires")
    assert serial(material) != old
    assert material.server_cert().not_valid_after_utc > later + datetime.timedelta(days=300)


def test_a_lost_ca_key_is_reported_not_silently_replaced(tmp_path):
    """Replacing the CA would make every tablet refuse the box: that is a person's decision."""
    material = SiteTLS(tmp_path / "tls", "gaza-east")
    material.ensure(NAMES)
    material.ca_key_file.unlink()
    with pytest.raises(TLSError, match="key .* is missing"):
        material.ensure(NAMES)


def test_an_unreadable_server_certificate_is_reissued(tmp_path):
    material = SiteTLS(tmp_path / "tls", "gaza-east")
    material.ensure(NAMES)
    material.server_cert_file.write_text("half a certificate after a power cut")
    assert material.ensure(NAMES).server_issued == "the old one was unreadable"
    material.server_cert().verify_directly_issued_by(material.ca_cert())


def test_two_boxes_never_share_a_key(tmp_path):
    one, two = SiteTLS(tmp_path / "a", "same-site"), SiteTLS(tmp_path / "b", "same-site")
    one.ensure(NAMES)
    two.ensure(NAMES)
    assert one.ca_key_file.read_bytes() != two.ca_key_file.read_bytes()
    assert one.server_key_file.read_bytes() != two.server_key_file.read_bytes()
    assert one.ca_cert().serial_number != two.ca_cert().serial_number


def test_box_names_cover_loopback_and_what_site_it_adds(monkeypatch):
    monkeypatch.setattr(tls.socket, "gethostname", lambda: "Clinic-Box.lan")
    names = tls.box_names("pacs.example.org 10.1.2.3")
    assert names[:3] == ["clinic-box", "clinic-box.local", "localhost"]
    assert {"127.0.0.1", "::1", "pacs.example.org", "10.1.2.3"} <= set(names)
    assert not any(name.startswith("fe80") for name in names)  # link-local: no use in a cert
    assert len(names) == len(set(names))


def test_only_a_ca_signed_for_this_key_by_a_root_can_be_installed(tmp_path):
    material = SiteTLS(tmp_path / "site", "gaza-east")
    material.ensure(NAMES)
    other = SiteTLS(tmp_path / "other", "gaza-west")
    other.ensure(NAMES)
    with pytest.raises(TLSError, match="another key"):
        material.install_ca_chain(other.ca_cert_file.read_text())
    with pytest.raises(TLSError, match="PEM"):
        material.install_ca_chain("not a certificate")
    # its own self-signed CA alone is no HQ signature
    with pytest.raises(TLSError, match="followed by the HQ root"):
        material.install_ca_chain(material.ca_cert_file.read_text())
    assert isinstance(material.ca_cert(), x509.Certificate)


def test_a_device_trusting_only_hqs_root_trusts_a_site_hq_signed(tmp_path):
    authority = Authority(tmp_path / "hq")
    created, root_print = authority.init()
    assert created and authority.init() == (False, root_print)
    site = SiteTLS(tmp_path / "site", "gaza-east")
    site.ensure(NAMES)
    self_signed = site.ca_cert()
    with pytest.raises(TLSError, match="not as site gaza-east's CA"):
        site.install_ca_chain(authority.sign_site(site.csr(), "gaza-west"))
    assert site.install_ca_chain(authority.sign_site(site.csr(), "gaza-east")) == root_print
    assert site.ensure(NAMES).server_issued == "none yet"  # reissued under the new chain
    leaf, site_ca = x509.load_pem_x509_certificates(site.server_cert_file.read_bytes())
    assert site_ca.issuer == authority.root().subject
    verifier = (PolicyBuilder().store(Store([authority.root()]))
                .build_server_verifier(DNSName("clinic-box.local")))
    chain = verifier.verify(leaf, [site_ca])
    assert chain[-1] == authority.root()
    # the box's own CA, as tablets installed it before, still vouches for the same key
    leaf.verify_directly_issued_by(self_signed)


def test_hq_signs_only_sound_requests(tmp_path):
    authority = Authority(tmp_path / "hq")
    with pytest.raises(TLSError, match="no root CA yet"):
        authority.sign_site("x", "gaza-east")
    authority.init()
    with pytest.raises(TLSError, match="not a PEM certificate signing request"):
        authority.sign_site("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "gaza-east")
    site = SiteTLS(tmp_path / "site", "gaza-east")
    site.ensure(NAMES)
    signed = x509.load_pem_x509_certificates(
        authority.sign_site(site.csr(), "gaza-east").encode())[0]
    constraints = signed.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0  # may sign servers, never CAs
