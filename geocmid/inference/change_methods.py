"""The label-free change methods by name (import-light: the CLI lists them without torch)."""

from __future__ import annotations

from typing import Literal

from geocmid.errors import InputError

__all__ = ('CHANGE_METHODS', 'ChangeMethod', 'check_method')

ChangeMethod = Literal['fusion', 'irmad', 'features', 'cva']
#: The label-free methods, the default first (chosen by bench/change.py; see docs/change.md).
CHANGE_METHODS: tuple[ChangeMethod, ...] = ('fusion', 'irmad', 'features', 'cva')


def check_method(method: str) -> ChangeMethod:
    """``method`` if it is a label-free method, else an InputError naming ``--method``."""
    if method not in CHANGE_METHODS:
        raise InputError('--method', f'unknown method {method!r} (use one of {CHANGE_METHODS})')
    return method
