"""Where in the user's code something happened: the first frame outside torch and gradaudit."""

from __future__ import annotations

import ast
import linecache
import os
import re
import site
import sys
import sysconfig
from functools import lru_cache
from types import CodeType, FrameType

import torch

from gradaudit.trace import Location

_GRADAUDIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIPPED_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, _GRADAUDIT_DIR + os.sep)


@lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    return filename.startswith("<frozen") or os.path.abspath(filename).startswith(_SKIPPED_DIRS)


def user_frame(start: FrameType | None = None) -> FrameType | None:
    frame = start or sys._getframe(1)
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


_OVERRIDES_FILE = os.path.abspath(torch.overrides.__file__)


def called_by_user() -> bool:
    """Whether the torch function being dispatched now was called from user code, not from torch itself
    (`F.relu(x)` in a training script, not `nn.ReLU.forward`)."""
    frame = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_GRADAUDIT_DIR + os.sep)
        or os.path.abspath(frame.f_code.co_filename) == _OVERRIDES_FILE
    ):
        frame = frame.f_back
    if frame is None or not _is_library_file(frame.f_code.co_filename):
        return frame is not None
    caller = frame.f_back  # a Python-level torch function (F.relu) that dispatched to the mode: who called it?
    return caller is not None and not _is_library_file(caller.f_code.co_filename)


def location_of(frame: FrameType | None) -> Location | None:
    if frame is None:
        return None
    return Location(_display_path(frame.f_code.co_filename, os.getcwd()), frame.f_lineno, frame.f_code.co_name)


def here() -> Location | None:
    """The user's line that is executing now."""
    return location_of(user_frame(sys._getframe(1)))


@lru_cache(maxsize=4096)
def _display_path(filename: str, cwd: str) -> str:
    """`stable_baselines3/ppo/ppo.py` for an installed package's file, else relative to the working directory when
    the file is below it (as compilers print paths), else the absolute path."""
    installed = package_path(filename) or _stdlib_path(filename)
    if installed is not None:
        return installed
    try:
        relative = os.path.relpath(filename, cwd)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


@lru_cache(maxsize=8)
def _package_dirs(search_path: tuple[str, ...]) -> tuple[str, ...]:
    """The folders installed packages live in, longest first (a venv's site-packages may sit below the stdlib's)."""
    paths = sysconfig.get_paths()
    found = {paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()}
    found |= {entry for entry in search_path if os.path.basename(entry) in ("site-packages", "dist-packages")}
    return tuple(sorted((os.path.abspath(d) + os.sep for d in found if d), key=len, reverse=True))


@lru_cache(maxsize=1)
def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(sorted({os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib")}, key=len, reverse=True))


def _below(filename: str, dirs: tuple[str, ...]) -> str | None:
    path = os.path.abspath(filename)
    return next((path[len(d) :] for d in dirs if path.startswith(d)), None)


@lru_cache(maxsize=4096)
def package_path(filename: str) -> str | None:
    """The path inside site-packages (`stable_baselines3/ppo/ppo.py`) of an installed package's file; None otherwise."""
    return _below(filename, _package_dirs(tuple(sys.path)))


@lru_cache(maxsize=4096)
def _stdlib_path(filename: str) -> str | None:
    return None if package_path(filename) is not None else _below(filename, _stdlib_dirs())


def is_program_frame(frame: FrameType) -> bool:
    """A frame of the audited program or of a package it uses, not of torch, gradaudit or the standard library."""
    filename = frame.f_code.co_filename
    return not _is_library_file(filename) and _stdlib_path(filename) is None


def expression_of(frame: FrameType | None) -> str:
    """The source text of the expression the frame is evaluating now (Python >= 3.11 positions)."""
    if frame is None:
        return ""
    return _expression_at(frame.f_code, frame.f_lasti)


@lru_cache(maxsize=16384)
def _expression_at(code: CodeType, lasti: int) -> str:
    try:
        positions = list(code.co_positions())[lasti // 2]
    except (AttributeError, IndexError):
        return ""
    start_line, end_line, start_col, end_col = positions
    if None in positions:
        return ""
    lines = [linecache.getline(code.co_filename, n) for n in range(start_line, end_line + 1)]
    if not lines or not lines[0]:
        return ""
    if len(lines) == 1:
        text = lines[0][start_col:end_col]
    else:
        text = lines[0][start_col:] + "".join(lines[1:-1]) + lines[-1][:end_col]
    return " ".join(text.split())


def operand_texts(expression: str) -> tuple[str, str] | None:
    """For `a + b`, `a - b` or `x += b`: the source text of both operands."""
    for mode in ("eval", "exec"):
        try:
            tree = ast.parse(expression, mode=mode)
        except SyntaxError:
            continue
        node = tree.body if mode == "eval" else (tree.body[0] if tree.body else None)
        if isinstance(node, ast.BinOp):
            left, right = node.left, node.right
        elif isinstance(node, ast.AugAssign):
            left, right = node.target, node.value
        else:
            return None
        return ast.get_source_segment(expression, left) or "", ast.get_source_segment(expression, right) or ""
    return None


def call_argument_text(expression: str, position: int, keyword: str) -> str:
    """The source text of a call's argument, by position or keyword."""
    try:
        node = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return ""
    if not isinstance(node, ast.Call):
        return ""
    for kw in node.keywords:
        if kw.arg == keyword:
            return ast.get_source_segment(expression, kw.value) or ""
    if len(node.args) > position:
        return ast.get_source_segment(expression, node.args[position]) or ""
    return ""


def assigned_name(frame: FrameType | None) -> str | None:
    """`critic_opt` for a frame executing `critic_opt = Adam(...)` (or `self.critic_opt = ...`)."""
    if frame is None:
        return None
    match = re.match(
        r"\s*(?:self\.)?([\w.]+)\s*(?::[^=]+)?=[^=]", linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    )
    return match.group(1) if match else None
