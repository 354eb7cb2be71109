"""MPPS: modalities say what they performed (N-CREATE "IN PROGRESS", N-SET "COMPLETED" or
"DISCONTINUED"), on MPPS_PORT under the appliance's AE title. Orthanc has no MPPS; this is a
pynetdicom SCP in `pacs-ris`.

A step is on disk before the modality hears success; it names its orders by the Accession
Numbers in its Scheduled Step Attributes Sequence. Those orders follow it: in progress (still on
the worklist, so a modality that crashed can pick the patient again), then completed or
discontinued (off the list: the item has expired). A step performed without an order (an
emergency, typed at the modality) is kept as it came. A finished step never changes again.

Access as for DICOM queries (DICOM_ACCESS): `open` takes any caller; `standard` and `strict`
take only declared modalities calling from their declared address, and the called AE title is
checked.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from ..orthanc import OrthancError
from . import worklist
from .orders import STEP_STATES, Orders

log = logging.getLogger(__name__)

# PS3.4 C.4.2.1 / F.7.2: the statuses a modality reads.
SUCCESS, PROCESSING_FAILURE, DUPLICATE, NO_SUCH_INSTANCE = 0x0000, 0x0110, 0x0111, 0x0112
INVALID_VALUE, MISSING_ATTRIBUTE, NOT_AUTHORIZED = 0x0106, 0x0120, 0x0124


class Mpps:
    def __init__(self, orders: Orders, worklists: Path, aet: str, access: str,
                 declared=None) -> None:
        """`declared()`: the declared modalities as Orthanc lists them ({name: {AET, Host}});
        asked only when `access` is not `open`."""
        self.orders = orders
        self.worklists = worklists
        self.aet = aet
        self.access = access
        self.declared = declared
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.server = None

    # --- who may report -----------------------------------------------------------------

    def _allowed(self, event) -> bool:
        """Read for each request (a modality declared a minute ago reports at once); the last
        list read stands while Orthanc does not answer."""
        if self.access == "open":
            return True
        caller = (event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address)
        with self._lock:
            try:
                self._known = {(str(m.get("AET", "")).strip(), str(m.get("Host", "")))
                               for m in self.declared().values()}
            except OrthancError as exc:
                log.warning("declared modalities not read (%s): the last list stands", exc)
            return caller in self._known

    # --- the two operations -------------------------------------------------------------

    def on_create(self, event) -> tuple[int, Dataset | None]:
        if not self._allowed(event):
            log.warning("MPPS N-CREATE from undeclared %s refused", event.assoc.requestor.ae_title)
            return NOT_AUTHORIZED, None
        try:
            step = event.attribute_list
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot decode
            log.warning("MPPS N-CREATE unreadable: %s", exc)
            return INVALID_VALUE, None
        status = str(step.get("PerformedProcedureStepStatus", "")).strip()
        if "ScheduledStepAttributesSequence" not in step or not status:
            return MISSING_ATTRIBUTE, None
        if status != "IN PROGRESS":
            return INVALID_VALUE, None
        uid = str(event.request.AffectedSOPInstanceUID or generate_uid())
        return self._keep(uid, status, step, create=True)

    def on_set(self, event) -> tuple[int, Dataset | None]:
        if not self._allowed(event):
            log.warning("MPPS N-SET from undeclared %s refused", event.assoc.requestor.ae_title)
            return NOT_AUTHORIZED, None
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            changes = event.modification_list
            stored = self._stored(uid)
        except KeyError:
            return NO_SUCH_INSTANCE, None
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot decode
            log.warning("MPPS N-SET unreadable: %s", exc)
            return INVALID_VALUE, None
        for element in changes:
            stored[element.tag] = element
        status = str(stored.get("PerformedProcedureStepStatus", "")).strip()
        if status not in STEP_STATES:
            return INVALID_VALUE, None
        return self._keep(uid, status, stored, create=False)

    def _stored(self, uid: str) -> Dataset:
        attributes = self.orders.step_attributes(uid)
        if attributes is None:
            raise KeyError(uid)
        return Dataset.from_json(attributes)

    def _keep(self, uid: str, status: str, step: Dataset,
              create: bool) -> tuple[int, Dataset | None]:
        accessions = [str(item.get("AccessionNumber", "") or "").strip()
                      for item in step.get("ScheduledStepAttributesSequence", [])]
        accessions = [accession for accession in dict.fromkeys(accessions) if accession]
        try:
            moved = self.orders.step(uid, status, accessions, step.to_json_dict(), create)
        except KeyError:
            return (DUPLICATE if create else NO_SUCH_INSTANCE), None
        except ValueError as exc:
            log.warning("MPPS %s refused: %s", uid, exc)
            return PROCESSING_FAILURE, None
        worklist.follow(self.worklists, self.orders, moved)
        log.info("MPPS %s %s: orders %s", uid, status,
                 ", ".join(accessions) or "none (performed without an order)")
        answer = Dataset()
        answer.AffectedSOPInstanceUID = uid
        answer.PerformedProcedureStepStatus = status
        return SUCCESS, answer

    # --- the server -----------------------------------------------------------------------

    def start(self, port: int, host: str = "0.0.0.0") -> None:
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(ModalityPerformedProcedureStep)
        ae.require_called_aet = self.access != "open"
        self.server = ae.start_server(
            (host, port), block=False,
            evt_handlers=[(evt.EVT_N_CREATE, self.on_create), (evt.EVT_N_SET, self.on_set)])
        log.info("MPPS listening on %s:%d as %s", host, port, self.aet)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
