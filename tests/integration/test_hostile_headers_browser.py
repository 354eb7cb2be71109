"""A stored-XSS attempt through DICOM headers, checked in a real browser (Debian's Chromium,
driven by Playwright) against the running appliance: a person signs in through the pages as
they would, then opens the hostile patient in every page the origin serves.
"""

from __future__ import annotations

import re

import pydicom
import pytest
import requests
from playwright.sync_api import sync_playwright
from pydicom.data import get_testdata_file

from gotg_pacs import config
from tests.support.site import running_appliance

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
# Each would set window.pwned if a page ever treated it as HTML or script.
HOSTILE_NAME = '<img src=x onerror="window.pwned=1">^<script>window.pwned=2</script>'
HOSTILE_ID = '../../etc/<svg onload="window.pwned=3">'
HOSTILE_STUDY = "<iframe src=javascript:window.top.pwned=4>"
PASSWORD = "a ward's own long secret"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xss")
    with running_appliance(folder) as env:
        settings = config.load(env)
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.PatientName, dataset.PatientID = HOSTILE_NAME, HOSTILE_ID
        dataset.StudyDescription = HOSTILE_STUDY
        hostile = folder / "hostile.dcm"
        dataset.save_as(hostile)
        stored = requests.post(f"{settings.orthanc_url}/instances", data=hostile.read_bytes(),
                               auth=settings.orthanc_credentials, timeout=30)
        assert stored.status_code == 200, stored.text
        yield settings, stored.json()


def test_html_in_dicom_headers_is_shown_as_text_and_never_runs(site):
    settings, stored = site
    origin = f"https://127.0.0.1:{settings.https_port}"
    dialogs = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            # Sign in through the pages: sent to the sign-in form, then asked for a new password.
            page.goto(f"{origin}/orthanc/app/explorer.html")
            assert "/auth/login" in page.url
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", settings.admin_password)
            page.click("button")
            page.fill("input[name=old]", settings.admin_password)
            page.fill("input[name=new]", PASSWORD)
            page.click("button")
            page.wait_for_load_state("networkidle")
            for path in (f"/orthanc/app/explorer.html#patient?uuid={stored['ParentPatient']}",
                         f"/orthanc/app/explorer.html#study?uuid={stored['ParentStudy']}",
                         "/orthanc/app/explorer.html#find-patients"):
                page.goto(origin + path)
                page.wait_for_load_state("networkidle")
                page.wait_for_timeout(1500)  # Explorer renders from its own REST calls
                assert page.evaluate("window.pwned") is None, path
            page.goto(f"{origin}/orthanc/app/explorer.html#patient?uuid="
                      f"{stored['ParentPatient']}")
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1500)
            shown = page.inner_text("body")
            assert "window.pwned=1" in shown, "the name is on the page, as text"
            assert page.evaluate("window.pwned") is None
            assert page.locator("img[src=x]").count() == 0
            # The sign-in page never sends anyone off the origin, whatever `next` says.
            page.goto(f"{origin}/auth/login?next=javascript:window.pwned=5")
            assert re.search(r'name="next" value="/"', page.content())
            page.goto(f"{origin}/auth/login?next=//evil.example/")
            assert 'value="/"' in page.content()
        finally:
            browser.close()
    assert dialogs == []

