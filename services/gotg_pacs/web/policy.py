"""Who may do what through the HTTPS origin: one table, read top to bottom, first match wins,
anything unmatched denied.

nginx asks the web service (`/auth/check`) before every request to a backend; the answer comes
from here. The roles, in the words of the people who hold them:

* admin: everything, including deleting, accounts and Orthanc's own tools;
* clinician (clinician or radiologist): view every study, export to a modality, mark urgent;
* radiographer: view, import images (STOW-RS, Orthanc's upload), the worklist and acquisition;
* hq_operator: HQ staff supporting a site: the archive's health and counts, no patient data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

READ = frozenset({"GET", "HEAD"})
WRITE = frozenset({"POST", "PUT"})
ANY = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
ROLES = ("admin", "clinician", "radiographer", "hq_operator")
EVERYONE = frozenset(ROLES)
STAFF = frozenset({"admin", "clinician", "radiographer"})


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str]
    path: str          # a regular expression matched against the whole path (no query)
    roles: frozenset[str]
    why: str


RULES: tuple[Rule, ...] = (
    # Orthanc: health and counts for everyone, patient data for staff, changes for few.
    Rule(READ, r"/orthanc/(system|statistics)", EVERYONE, "health and counts hold no patient"),
    Rule(frozenset({"POST"}), r"/orthanc/tools/(find|lookup)", STAFF, "searching"),
    Rule(ANY, r"/orthanc/tools/.*", frozenset({"admin"}), "Orthanc's tools act on everything"),
    Rule(ANY, r"/orthanc/(jobs|peers|plugins|changes|exports)(/.*)?", frozenset({"admin"}),
         "the archive's machinery"),
    Rule(frozenset({"GET", "HEAD", "POST", "PUT"}), r"/orthanc/modalities(/.*)?",
         frozenset({"admin"}), "declaring modalities"),
    Rule(READ, r"/orthanc/app/.*", STAFF, "Orthanc Explorer"),
    Rule(READ, r"/orthanc/(patients|studies|series|instances)(/.*)?", STAFF,
         "viewing studies"),
    Rule(frozenset({"POST"}), r"/orthanc/instances", frozenset({"admin", "radiographer"}),
         "importing images"),
    Rule(frozenset({"POST"}), r"/orthanc/(studies|series|instances)/[^/]+/(archive|media)",
         frozenset({"admin", "clinician"}), "exporting a study (audited)"),
    # DICOMweb: the viewer reads; STOW-RS imports.
    Rule(READ, r"/dicom-web/.*", STAFF, "viewing studies"),
    Rule(frozenset({"POST"}), r"/dicom-web/studies(/[^/]+)?", frozenset({"admin", "radiographer"}),
         "importing images"),
    # The appliance's own API.
    Rule(frozenset({"POST"}), r"/api/studies/[^/]+/urgent", frozenset({"admin", "clinician"}),
         "marking a study urgent"),
    Rule(READ, r"/api/users", frozenset({"admin"}), "accounts"),
    Rule(READ, r"/api/audit", frozenset({"admin"}), "the audit trail"),
    Rule(WRITE, r"/api/users(/[^/]+(/(reset|disable|enable))?)?", frozenset({"admin"}),
         "accounts"),
    Rule(ANY, r"/orthanc/.*", frozenset({"admin"}), "anything else of Orthanc's: changes, "
                                                   "deletions"),
)


def allowed(role: str, method: str, path: str) -> bool:
    """Whether `role` may send `method` to `path` (the path without its query)."""
    for rule in RULES:
        if method.upper() in rule.methods and re.fullmatch(rule.path, path):
            return role in rule.roles
    return False
