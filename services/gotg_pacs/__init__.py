"""GOTG PACS appliance services."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gotg-pacs")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
