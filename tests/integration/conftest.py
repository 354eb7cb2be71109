from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    # The hook sees the whole session's items: mark only those under this folder.
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)
