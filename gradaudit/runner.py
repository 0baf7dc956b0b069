"""Runs a program under an audit exactly as `python SCRIPT`, `python FOLDER` or `python -m MODULE` would, and
records how it ended: returned, exited (`sys.exit`, `os._exit`), raised, was interrupted, or was stopped by us."""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import os
import pkgutil
import runpy
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.machinery import ModuleSpec, SourceFileLoader
from pathlib import Path
from typing import NoReturn

from gradaudit.capture import Audit, StopAudit
from gradaudit.distributed import UnfinishedReduction

_GRADAUDIT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

INTERRUPTED_STATUS = 130
"""What a shell reports for a program ended by Ctrl-C (128 + SIGINT)."""


class ProgramNotFound(Exception):
    """The script, folder or module does not exist."""


@dataclass
class Outcome:
    """How the audited program ended."""

    stopped_by: str
    """iterations | cap (gradaudit stopped it) | program-end (returned or exited) | exception | interrupted"""
    status: int = 0
    """The exit status `python` itself would have ended with: 1 for an uncaught exception, 130 for Ctrl-C."""
    ending: str = ""
    """How it ended, in words ('called sys.exit(3)', 'raised ValueError: diverged'); empty for a plain end."""
    exit_message: str = ""
    """What `sys.exit(<not an int>)` prints to stderr (Python then exits with status 1)."""
    traceback: str = ""
    """The program's own traceback (gradaudit's and runpy's frames left out), for an exception or Ctrl-C."""
    stop_swallowed: bool = False
    """The program caught gradaudit's stop and ran on, unaudited, to its end."""


Conclude = Callable[[Outcome], int]
"""Reports an outcome (trace, findings, outputs) and returns gradaudit's exit status."""


def _user_traceback(exc: BaseException) -> str:
    """The program's traceback without gradaudit's and runpy's frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_GRADAUDIT_DIR) and f.filename != runpy.__file__
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _exited(exc: SystemExit) -> Outcome:
    """`sys.exit(code)` as Python ends with it: None is 0, an int is itself, anything else is printed and 1."""
    code = exc.code
    call = f"called sys.exit({'' if code is None else repr(code)})"
    if code is None or isinstance(code, int):
        return Outcome("program-end", status=int(code or 0), ending=call if code else "")
    return Outcome("program-end", status=1, ending=call, exit_message=str(code))


def check_target(target: str, as_module: bool) -> None:
    """Fails as `python` would before running anything (a module: with the working folder already on sys.path)."""
    if as_module:
        if _module_spec(target) is None:
            raise ProgramNotFound(f"no module named {target!r}")
    elif pkgutil.get_importer(target) is not None:  # a folder or zip archive, as `python PATH` tells them apart
        if _folder_main(target) is None:
            raise ProgramNotFound(f"can't find '__main__' module in {target!r}")
    elif not Path(target).is_file():
        raise ProgramNotFound(f"no such script: {target}")


def _module_spec(target: str) -> ModuleSpec | None:
    """The module's spec, None when it or a parent package does not exist. Finding it imports the parent
    packages, as `python -m` does; one that fails to import makes the module unrunnable."""
    try:
        return importlib.util.find_spec(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and f"{target}.".startswith(f"{exc.name}."):
            return None
        failure: Exception = exc
    except Exception as exc:  # noqa: BLE001 - a parent package's own error, said in one line
        failure = exc
    raise ProgramNotFound(f"error while finding module {target!r} ({type(failure).__name__}: {failure})")


def _folder_main(path: str) -> ModuleSpec | None:
    """The spec of `__main__` in a folder or zip archive (None for a plain script or a folder without one)."""
    finder = pkgutil.get_importer(path)
    return None if finder is None else finder.find_spec("__main__")


def _run_as_main(path: str) -> None:
    """Executes a script, folder or zip archive in a fresh `__main__` module with what `python PATH` gives it:
    an absolute `__file__`, `sys.argv[0]` as typed, the script's folder (or the folder itself) first on sys.path."""
    absolute = os.path.abspath(path)
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    spec = _folder_main(absolute)
    if spec is not None:
        sys.path.insert(0, absolute)
        code = spec.loader.get_code("__main__")
        main.__file__, main.__cached__, main.__spec__, main.__loader__ = spec.origin, spec.cached, spec, spec.loader
        main.__package__ = ""
    else:
        sys.path.insert(0, os.path.dirname(os.path.realpath(absolute)))
        code = compile(Path(absolute).read_bytes(), absolute, "exec", dont_inherit=True)
        main.__file__, main.__cached__ = absolute, None
        main.__loader__ = SourceFileLoader("__main__", absolute)
    saved_main = sys.modules["__main__"]
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        sys.modules["__main__"] = saved_main


def _hard_exit(audit: Audit, conclude: Conclude) -> Callable[[int], NoReturn]:
    """`os._exit` for the audited process: reports what was seen first, since no `finally` or atexit will run."""
    real_exit = os._exit
    auditing_process = os.getpid()

    def _exit(status: int) -> NoReturn:
        if os.getpid() == auditing_process and isinstance(status, int):
            audit.recorder.uninstall()
            try:
                status = conclude(
                    _seen_by(audit, Outcome("program-end", status=status, ending=f"called os._exit({status})"))
                )
            except BaseException:  # noqa: BLE001 - the process ends here whatever happens: say why the report is missing
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        real_exit(status)

    return _exit


def _seen_by(audit: Audit, outcome: Outcome) -> Outcome:
    """Adds what the recorder knows: whether gradaudit's own stop ended the window, and whether it was caught."""
    if audit.recorder.stopped_by in ("iterations", "cap"):
        outcome.stopped_by = audit.recorder.stopped_by
    outcome.stop_swallowed = audit.recorder.stop_swallowed
    return outcome


DEEP_GRAPH_STACK = 120 << 20
"""Bytes of C stack the program's main thread may grow to while it runs under `gradaudit run`."""


@contextlib.contextmanager
def _stack_for_deep_graphs() -> Iterator[None]:
    """PyTorch frees a chain of graph nodes that have Python wrappers recursively on the C stack (about 190 bytes a
    node), and the audit gives many nodes wrappers: a 150,000-op chain overflows the usual 8 MiB. The main thread's
    stack grows on demand up to RLIMIT_STACK, read when it grows, so a larger soft limit while the program runs is
    enough (threads started by then keep their size). Restored afterwards."""
    try:
        import resource
    except ImportError:  # not on POSIX
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = DEEP_GRAPH_STACK if hard == resource.RLIM_INFINITY else min(DEEP_GRAPH_STACK, hard)
    raise_it = soft != resource.RLIM_INFINITY and soft < wanted
    if raise_it:
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    try:
        yield
    finally:
        if raise_it:
            resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


def run_program(audit: Audit, target: str, args: list[str], as_module: bool, conclude: Conclude) -> Outcome:
    """Runs the program under `audit` and says how it ended. `conclude` reports an `os._exit` before it happens."""
    saved_argv, saved_path, saved_exit = sys.argv[:], sys.path[:], os._exit
    sys.argv = [target, *args]
    outcome = Outcome("program-end")
    try:
        if as_module:
            sys.path.insert(0, os.getcwd())  # before the check, as `python -m` finds local packages
        check_target(target, as_module)
        os._exit = _hard_exit(audit, conclude)
        audit.recorder.on_backward = UnfinishedReduction(audit.recorder)
        with _stack_for_deep_graphs(), audit:
            try:
                if as_module:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    _run_as_main(target)
            except StopAudit:
                raise
            except SystemExit as exc:
                outcome = _exited(exc)
            except KeyboardInterrupt as exc:
                outcome = Outcome(
                    "interrupted",
                    status=INTERRUPTED_STATUS,
                    ending="was interrupted (KeyboardInterrupt)",
                    traceback=_user_traceback(exc),
                )
            except BaseException as exc:  # noqa: BLE001 - the program's own failure, reported as such
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                outcome = Outcome("exception", status=1, ending=f"raised {error}", traceback=_user_traceback(exc))
    finally:
        sys.argv, sys.path[:], os._exit = saved_argv, saved_path, saved_exit
    return _seen_by(audit, outcome)
