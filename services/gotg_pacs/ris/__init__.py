"""The RIS bridge (`pacs-ris`): orders in, worklist items out, statuses back, reports attached.

`hl7_orders` reads HL7 v2 orders (ORM^O01, OMI^O23) into `Order`s or refuses them with why;
`orders` keeps them durably (the worklist must answer with the RIS unreachable); `worklist`
renders each order as the DICOM Modality Worklist item Orthanc answers modalities with; `mllp`
is the HL7 listener (MLLP) that acknowledges a message only once what it says is on disk;
`mpps` hears from the modalities what they performed; `studies` follows Orthanc's
completed studies to their orders and keeps the reconciliation list; `hl7_reports` reads
HL7 results (ORU^R01) and `reports` keeps reports until it attaches them to their studies as
DICOM SR and PDF; `hl7_patients` reads ADT updates and merges and `demographics` carries them
into the orders, the worklist and the images; `rest` is the RIS's REST API both ways;
`commands` is `pacs ris`.
"""
