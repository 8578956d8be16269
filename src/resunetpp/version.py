"""The installed version, from the package metadata, in a module of its own so any module can read it
without importing the package's top level (which imports most of the package)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("resunetpp")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
