"""The data disk: Orthanc's images and index on a disk of their own (a USB SSD beside an SD card),
LUKS2-encrypted when asked, so a box carried off with its disk gives nobody the patients.

`devices` says which disk may become the data disk or its key stick, `luks` makes and opens the
encryption, `move` puts the archive there without losing an image, `commands` is `pacs
data-disk`.
"""
