"""A modality's MPPS client (pynetdicom's SCU), as the RIS bridge's tests and the booted
appliance's meet one."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep


def step(accession: str, status: str = "IN PROGRESS") -> Dataset:
    """What a modality sends when it starts the procedure (N-CREATE)."""
    scheduled = Dataset()
    scheduled.AccessionNumber = accession
    scheduled.StudyInstanceUID = generate_uid()
    scheduled.RequestedProcedureID = "RP1"
    scheduled.ScheduledProcedureStepID = "SPS1"
    performed = Dataset()
    performed.ScheduledStepAttributesSequence = [scheduled]
    performed.PatientName = "Doe^Jane^Q"
    performed.PatientID = "PAT-4711"
    performed.PerformedProcedureStepID = "PPS1"
    performed.PerformedStationAETitle = "DCMTK_MODALITY"
    performed.PerformedProcedureStepStartDate = "20261127"
    performed.PerformedProcedureStepStartTime = "110500"
    performed.PerformedProcedureStepStatus = status
    performed.Modality = "CR"
    done = Dataset()  # what the radiographer chose at the modality: two views
    done.CodeValue, done.CodingSchemeDesignator, done.CodeMeaning = \
        "CXR2", "LOCAL", "Chest X-ray 2 views"
    performed.ProcedureCodeSequence = [done]
    return performed


class MppsModality:
    """A modality's MPPS client, as pynetdicom's SCU is."""

    def __init__(self, port: int, called_aet: str, host: str = "127.0.0.1",
                 calling_aet: str = "DCMTK_MODALITY") -> None:
        self.port, self.called_aet, self.host = port, called_aet, host
        self.calling_aet = calling_aet

    def _call(self, send) -> int:
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
        assert assoc.is_established, "association refused"
        try:
            status, _ = send(assoc)
            return int(status.Status)
        finally:
            assoc.release()

    def create(self, uid: str, step: Dataset) -> int:
        return self._call(lambda assoc: assoc.send_n_create(
            step, ModalityPerformedProcedureStep, uid))

    def set(self, uid: str, status: str) -> int:
        change = Dataset()
        change.PerformedProcedureStepStatus = status
        change.PerformedProcedureStepEndDate = "20261127"
        change.PerformedProcedureStepEndTime = "111500"
        return self._call(lambda assoc: assoc.send_n_set(
            change, ModalityPerformedProcedureStep, uid))
