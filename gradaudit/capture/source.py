"""Where in the user's code something happened: the first frame outside torch and gradaudit."""

from __future__ import annotations

import ast
import linecache
import os
import re
import sys
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
    """Relative to the working directory when the file is below it, as compilers print paths."""
    try:
        relative = os.path.relpath(filename, cwd)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


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


def name_in_frame(obj: object, frame: FrameType | None) -> str | None:
    """The name the user's code knows `obj` by: a local, an attribute of a local (`self.critic` -> `critic`), a global."""
    if frame is None:
        return None
    scopes = (frame.f_locals, frame.f_globals)
    for scope in scopes:
        for name, value in scope.items():
            if value is obj:
                return name
    for scope in scopes:
        for owner_name, owner in list(scope.items()):
            attributes = getattr(owner, "__dict__", None)
            if not isinstance(attributes, dict) or isinstance(owner, type):
                continue
            attribute = _attribute_holding(obj, owner)
            if attribute is not None:
                return attribute if owner_name == "self" else f"{owner_name}.{attribute}"
    return None


def _attribute_holding(obj: object, owner: object) -> str | None:
    attributes = vars(owner)
    for store in (attributes, attributes.get("_modules"), attributes.get("_parameters")):
        if isinstance(store, dict):
            for name, value in store.items():
                if value is obj:
                    return name
    return None
