"""Runs a program as `__main__` under an audit, exactly as `python SCRIPT ARGS` / `python -m MODULE ARGS` would."""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from gradaudit.capture import Audit, StopAudit


class ProgramNotFound(Exception):
    """The script file or module does not exist."""


@dataclass
class Outcome:
    stopped_by: str
    """iterations | program-end | exception"""
    exit_code: int | None = None
    error: str = ""
    traceback: str = ""


def _user_traceback(exc: BaseException) -> str:
    """The program's traceback without gradaudit's and runpy's frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(os.path.dirname(os.path.dirname(__file__))) and "runpy" not in f.filename
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def check_target(target: str, as_module: bool) -> None:
    if as_module:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ProgramNotFound(f"no module named {target!r}")
    elif not Path(target).is_file():
        raise ProgramNotFound(f"no such script: {target}")


def run_program(audit: Audit, target: str, args: list[str], as_module: bool) -> Outcome:
    check_target(target, as_module)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    if not as_module:
        sys.path.insert(0, str(Path(target).resolve().parent))
    else:
        sys.path.insert(0, os.getcwd())
    outcome = Outcome("program-end")
    try:
        with audit:
            try:
                if as_module:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except StopAudit:
                raise
            except SystemExit as exc:
                outcome.exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - the program's own failure, reported as such
                outcome = Outcome("exception", error=f"{type(exc).__name__}: {exc}", traceback=_user_traceback(exc))
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if audit.recorder.stopped_by in ("iterations", "cap"):
        outcome.stopped_by = audit.recorder.stopped_by
    return outcome
