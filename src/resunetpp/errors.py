"""Errors the library raises about its own arguments, for any front end to map to its own words.

A library error names the setting (`size 48 is not a multiple of ...`), never a command-line flag: the
command line (`resunetpp.cli.common`) maps each error to a message, an exit code and, where the setting is
one of the command's options, that option's flag.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting that cannot be used: unknown, of the wrong type, out of range, missing or combined wrongly.

    Args:
        message: What is wrong, naming the setting as the library calls it (`size`, `batch_size`).
        setting: The setting's name, so that a front end can point at its own option for it; None when the
            error is about no single setting (or the message already says where it was read, e.g. a file).
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting
