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

import contextlib
import errno
import math
import re
from collections.abc import Iterator, Mapping
from enum import Enum, IntEnum

import typer

from resunetpp.data import DatasetCheckError
from resunetpp.data.download import DownloadError
from resunetpp.data.layouts import DataLayoutError
from resunetpp.device import DeviceError
from resunetpp.errors import SettingError
from resunetpp.inference.crf import CRFUnavailableError
from resunetpp.inference.export import ParityError
from resunetpp.inference.predict import PredictOutputError
from resunetpp.io import ImageReadError
from resunetpp.spec import ModelError
from resunetpp.training.loop import CheckpointError, CheckpointWriteError, NonFiniteError

try:
    from typer.core import TyperArgument, TyperOption
except ImportError:  # another typer: its own help, unchanged
    TyperArgument = TyperOption = None


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


# The one mapping from library exceptions to exit codes (docs/cli.md's table), most specific first.
ERRORS: list[tuple[tuple[type[BaseException], ...], ExitCode]] = [
    # 1: the command ran and stopped part-way (its last good files kept) or its result failed a check
    ((NonFiniteError, CheckpointWriteError, ParityError), ExitCode.PARTIAL),
    # 2: an option (or a setting) this machine or this command cannot take
    ((SettingError, DeviceError, CRFUnavailableError, ImportError), ExitCode.USAGE),
    # 3: what was given cannot be used: weights, a spec, images, data, a checkpoint, a path
    ((ModelError, ImageReadError, DatasetCheckError, DataLayoutError, CheckpointError, DownloadError,
      PredictOutputError, OSError), ExitCode.BAD_INPUT),
]


def exit_code(e: BaseException, plain: ExitCode = ExitCode.USAGE) -> ExitCode:
    """The exit code of a library exception: the typed ones by `ERRORS`; a plain ValueError, KeyError or
    TypeError (a setting out of range, an unknown name) by `plain`: USAGE, except in `data`, whose plain
    errors are about the dataset (BAD_INPUT); anything else (a RuntimeError mid-run) is PARTIAL."""
    for types, code in ERRORS:
        if isinstance(e, types):
            return code
    if isinstance(e, (ValueError, KeyError, TypeError)):
        return plain
    return ExitCode.PARTIAL


def error_message(e: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """One line for an exception: a KeyError's own text (not its repr), the real cause of a full disk, and,
    for a setting the library refused (it names settings, never flags), the command's flag from `flags`."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = str(msg) or type(e).__name__
    if isinstance(e, OSError) and e.errno == errno.ENOSPC and "no space left" not in msg.lower():
        msg += " (no space left on device)"
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    flag = (flags or {}).get(e.setting) if isinstance(e, SettingError) and e.setting else None
    if flag and flag not in msg:
        msg += f" ({flag})"
    return msg.strip() or type(e).__name__


HANDLED = (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError)


@contextlib.contextmanager
def errors(plain: ExitCode = ExitCode.USAGE, flags: Mapping[str, str] | None = None) -> Iterator[None]:
    """Every command's body runs in this: a library exception becomes one `error:` line and the exit code of
    `exit_code` (never a traceback). typer.Exit and Ctrl-C pass through.

    Args:
        plain: The exit code of a plain ValueError, KeyError or TypeError (see `exit_code`).
        flags: The command's flag for each library setting it sets (`{"batch_size": "--batch-size"}`),
            named after the message of a `SettingError` about that setting.
    """
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except HANDLED as e:
        raise fail(error_message(e, flags), exit_code(e, plain)) from None


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
           below: bool = False):
    """A typer callback checking a numeric option at parse time: finite (no nan, inf), >= `minimum` (> with
    `above`) and <= `maximum` (< with `below`); None (not given) passes. A bad value is a usage error (2)."""

    def check(value):
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise typer.BadParameter(f"{value} is not {'>' if above else '>='} {minimum:g}")
        if maximum is not None and (value >= maximum if below else value > maximum):
            raise typer.BadParameter(f"{value} is not {'<' if below else '<='} {maximum:g}")
        return value

    return check


def choices(name: str, values) -> type:
    """A str Enum of the library's own tuple of names (`Backend = choices("Backend", BACKENDS)`), so
    typer shows and checks them as choices, and a name added to the library is offered at once.
    Members are looked up by value: `Backend("torch")`."""
    return Enum(name, {v: v for v in values}, type=str)


def _tidy_help_types() -> None:
    """typer's help shows `<bool>` after every flag (--tta, --help) and `<list[str]>` for a variadic
    argument; a flag takes no value and `INPUTS...` already says "several". Show neither.
    Runs once, when the command modules import this one."""
    if TyperOption is None:
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
