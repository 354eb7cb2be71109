"""pacs-web's API fuzzed against its own OpenAPI description (schemathesis, hypothesis
underneath), on a running appliance, signed in as the admin: every answer is documented and
well-formed, none is a server error, and no study is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from gotg_pacs import config
from gotg_pacs.web import app as web_app
from tests.support import corpus
from tests.support.site import running_appliance

SPEC = Path(web_app.__file__).with_name("openapi.yaml")
PASSWORD = "a fuzzing ward's secret"


class Web:
    def __init__(self, env: Path) -> None:
        self.settings = config.load(env)
        self.url = f"http://127.0.0.1:{self.settings.web_api_port}"

    def session(self) -> str:
        """A fresh session (a fuzzed logout may have ended the last one)."""
        answer = requests.post(f"{self.url}/auth/login", timeout=30,
                               json={"user": "admin", "password": PASSWORD})
        assert answer.status_code == 200, answer.text
        return answer.cookies["pacs_session"]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    with running_appliance(tmp_path_factory.mktemp("fuzz")) as env:
        site = Web(env)
        first = requests.post(f"{site.url}/auth/login", timeout=30, json={
            "user": "admin", "password": site.settings.admin_password})
        changed = requests.post(f"{site.url}/auth/password", timeout=30,
                                cookies={"pacs_session": first.cookies["pacs_session"]},
                                json={"old": site.settings.admin_password, "new": PASSWORD})
        assert changed.status_code == 200, changed.text
        stored = requests.post(f"{site.settings.orthanc_url}/instances", timeout=60,
                               data=corpus.representative()[0].read_bytes(),
                               auth=site.settings.orthanc_credentials)
        assert stored.status_code == 200
        yield site


def test_every_operation_answers_as_documented(web):
    """Each operation of the description, 25 generated requests each (schemathesis's own
    pytest plugin does not run on this pytest: its strategies are driven here instead)."""
    api = schemathesis.openapi.from_path(SPEC)
    api.config.update(base_url=web.url)

    def stored() -> int:
        return requests.get(f"{web.settings.orthanc_url}/statistics", timeout=30,
                            auth=web.settings.orthanc_credentials).json()["CountInstances"]

    before = stored()
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def answers_as_documented(case) -> None:
            # Rules beyond the schema refuse some schema-valid requests by design (a wrong
            # current password, a new one holding the account's name, a name taken): 400s.
            case.call_and_validate(cookies={"pacs_session": web.session()},
                                   excluded_checks=[positive_data_acceptance])

        answers_as_documented()
    assert stored() == before, "fuzzing the API changed no study"
