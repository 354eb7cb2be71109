"""Fixtures the RIS bridge's unit tests share."""

from __future__ import annotations

import pytest

from gotg_pacs.ris.mllp import Listener
from gotg_pacs.ris.orders import Orders


@pytest.fixture
def listener(tmp_path):
    """The HL7 listener over a fresh orders store, its worklist folder made."""
    (tmp_path / "worklists").mkdir()
    with Orders(tmp_path / "ris" / "orders.sqlite") as orders:
        yield Listener(orders, tmp_path / "worklists", "site-a")
