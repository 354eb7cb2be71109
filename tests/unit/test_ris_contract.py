"""The RIS contract (services/gotg_pacs/ris/openapi.yaml) against both its sides: what the bridge
sends, and what the tests' reference RIS answers.

Why it matters: the GOTG RIS is built by others from this document. If the bridge sent anything
the document does not describe, or the reference RIS the tests use spoke another dialect, the
tests would prove nothing about the real pairing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jsonschema
import yaml

from gotg_pacs.ris import rest
from tests.support.reference_ris import ReferenceRis

CONTRACT = yaml.safe_load((Path(rest.__file__).with_name("openapi.yaml")).read_text())


def _validator(name: str) -> jsonschema.Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": CONTRACT["components"]}
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_the_contract_names_every_call_the_bridge_makes():
    assert CONTRACT["info"]["version"] == "1.1.0"
    assert set(CONTRACT["paths"]) == {"/api/v1/appointments", "/api/v1/reports",
                                      "/api/v1/appointments/{accession_number}/status"}
    statuses = set(CONTRACT["components"]["schemas"]["Appointment"]["properties"]["status"]
                   ["enum"])
    assert statuses == set(rest.ACTIONS), "every appointment status the contract names is read"


def test_what_the_bridge_sends_and_the_reference_answers_follow_the_contract():
    reference = ReferenceRis().up()
    try:
        reference.schedule("C-1")
        reference.schedule("C-2", status="cancelled")
        client = rest.RisClient(reference.url, reference.api_key, timeout=10)
        found, following, more = client.page("appointments", "")
        appointment = _validator("Appointment")
        for item in found:
            appointment.validate(item)
        assert [item["accession_number"] for item in found] == ["C-1", "C-2"]
        assert (following, more) == ("2", False)
        client.post_status({"seq": 1, "event_id": "5a0e4c1e-7f44-4c5b-9b53-1f6d1c1f0a01",
                            "accession": "C-1", "status": "images_available",
                            "at": 1795770000.0, "study_uid": "1.2.3",
                            "performed": json.dumps({"procedures": [
                                {"code": "CXR", "scheme": "LOCAL", "meaning": "Chest X-ray"}],
                                "series": 2, "images": 3, "modalities": ["CR"]})})
        client.post_status({"seq": 2, "event_id": "5a0e4c1e-7f44-4c5b-9b53-1f6d1c1f0a02",
                            "accession": "C-1", "status": "completed", "at": 1795770001.0,
                            "study_uid": ""})
        event = _validator("StatusEvent")
        for sent in reference.events:
            event.validate({key: value for key, value in sent.items() if key != "accession"})
        assert [sent["status"] for sent in reference.events] == ["images_available",
                                                                 "completed"]
        assert "study_instance_uid" not in reference.events[1], "absent rather than empty"
        assert reference.events[0]["performed"]["images"] == 3
        assert "performed" not in reference.events[1]

        reference.sign("C-1", "No acute findings.\nHeart size normal.")
        reference.sign("C-1", "Amended: small left effusion.", status="amended",
                       pdf=base64.b64encode(b"%PDF-1.4 tiny").decode())
        found, following, more = client.page("reports", "")
        report = _validator("Report")
        for item in found:
            report.validate(item)
        assert (following, more) == ("2", False)
        read = [rest.report_of(item) for item in found]
        assert [(r.status, r.author, r.pdf[:5]) for r in read] == [
            ("final", "Quinn^Ada", b""), ("corrected", "Quinn^Ada", b"%PDF-")]
        assert read[0].text == "No acute findings.\nHeart size normal."
    finally:
        reference.down()
