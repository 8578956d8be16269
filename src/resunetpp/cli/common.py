"""What every `resunetpp` command shares: its exit codes and the one-line error.

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | partial failure: the command ran, but some items failed (predict: some images, or the disk
|   | filled up; data check: unusable pairs; export: the parity check) |
| 2 | usage error: an option is missing, unknown, out of range or combined wrongly (typer's code too) |
| 3 | bad input: what was given cannot be used and nothing was done (weights or data not found,
|   | unreadable or not matching their config; --out not writable) |
| 130 | interrupted (Ctrl-C): what was done so far is kept and summarised |
"""

from __future__ import annotations

from enum import IntEnum

import typer


class ExitCode(IntEnum):
    OK = 0
    PARTIAL = 1
    USAGE = 2
    BAD_INPUT = 3
    INTERRUPTED = 130


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> typer.Exit:
    """Print `error: message` on stderr and return the `typer.Exit` to raise (`raise fail(...) from None`)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


def choices(name: str, values) -> type:
    """A str Enum of the library's own tuple of names (`Backend = choices("Backend", BACKENDS)`), so
    typer shows and checks them as choices, and a name added to the library is offered at once.
    Members are looked up by value: `Backend("torch")`."""
    from enum import Enum

    return Enum(name, {v: v for v in values}, type=str)


def _tidy_help_types() -> None:
    """typer's help shows `<bool>` after every flag (--tta, --help) and `<list[str]>` for a variadic
    argument; a flag takes no value and `INPUTS...` already says "several". Show neither.
    Runs once, when the command modules import this one."""
    import re

    try:
        from typer.core import TyperArgument, TyperOption
    except ImportError:  # another typer: its own help, unchanged
        return
    for cls in (TyperOption, TyperArgument):
        original = getattr(cls, "display_type_rich", None)
        if original is None or getattr(original, "_resunetpp", False):
            continue

        def display_type_rich(self, ctx, _original=original):
            if getattr(self, "is_flag", False) and self.metavar is None:
                return None
            shown = _original(self, ctx)
            if isinstance(shown, str):
                shown = re.sub(r"<list\[(.*)\]>(\.\.\.)?", r"<\1>...", shown)
            return shown

        display_type_rich._resunetpp = True
        cls.display_type_rich = display_type_rich


_tidy_help_types()
