"""Run configurations: typed values from a YAML file merged with command-line options.

A setting is resolved as default < YAML file < command line. Every key is checked against the
type annotations of the class (or function) that consumes it, so a misspelt key or a value of the
wrong type fails before any work starts, with an :class:`~geocmid.errors.InputError` naming the key
and the file.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from geocmid.errors import InputError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping.

    Args:
        path: The YAML file.

    Returns:
        The mapping (empty for an empty file).

    Raises:
        InputError: If the file is missing, unreadable, not YAML, or not a mapping.
    """
    try:
        text = Path(path).read_text(encoding='utf-8')
    except FileNotFoundError:
        raise InputError(path, 'config file not found') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f'cannot read config file ({exc})') from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).replace('\n', ' ')
        raise InputError(path, f'not valid YAML: {problem}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise InputError(path, f'a config file must be a mapping of keys, not {kind}')
    return data


def parse_values(
    values: Mapping[str, Any],
    hints: Mapping[str, Any],
    source: str | os.PathLike[str] | None,
    *,
    section: str | None = None,
) -> dict[str, Any]:
    """Check keys against ``hints`` and convert each value to its annotated type.

    Args:
        values: Raw values, e.g. from YAML.
        hints: Allowed keys and their type annotations.
        source: Where the values came from (named in errors), e.g. the YAML file.
        section: Optional section name, prefixed to keys in errors (``task.lr``).

    Returns:
        The converted values.

    Raises:
        InputError: For an unknown key or a value that does not fit its type.
    """
    parsed = {}
    for key, value in values.items():
        name = f'{section}.{key}' if section else str(key)
        if key not in hints:
            known = ', '.join(sorted(hints))
            raise InputError(source, f"unknown config key '{name}' (known keys: {known})")
        try:
            parsed[key] = _convert(value, hints[key])
        except (TypeError, ValueError) as exc:
            raise InputError(source, f"config key '{name}': {exc}") from None
    return parsed


def dataclass_hints(cls: type) -> dict[str, Any]:
    """The settable fields of a dataclass and their resolved type annotations."""
    resolved = typing.get_type_hints(cls)
    return {field.name: resolved[field.name] for field in dataclasses.fields(cls) if field.init}


def signature_hints(function: Callable[..., Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword parameters of ``function`` (e.g. a task's ``__init__``) and their types."""
    resolved = typing.get_type_hints(function)
    names = [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if name != 'self'
        and name not in exclude
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    return {name: resolved.get(name, Any) for name in names}


def resolve[T](
    cls: type[T],
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build the dataclass ``cls`` from its defaults, a YAML file and command-line overrides.

    Args:
        cls: A dataclass whose fields are the settings.
        config_file: Optional YAML file; its keys must be fields of ``cls``.
        overrides: Values given on the command line; ``None`` means "not given" and keeps the
            YAML value or the default.

    Returns:
        The resolved settings.

    Raises:
        InputError: For an unknown key or a badly typed value in the file or the overrides.
    """
    hints = dataclass_hints(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(parse_values(load_yaml(config_file), hints, config_file))
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    values.update(parse_values(given, hints, 'command line'))
    return cls(**values)


def to_plain(config: DataclassInstance) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-serialisable values (paths become strings)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _convert(value: Any, hint: Any) -> Any:
    """Convert one YAML/command-line value to ``hint``, or raise TypeError/ValueError.

    Written by hand because only a handful of annotation forms occur in geocmid's settings
    (scalars, paths, optionals, lists, literals, plain mappings) and the error must name the key.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _convert(value, option)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(' or '.join(errors))
    if origin is Literal:
        # YAML reads 32 as an int where a string choice such as '32' is meant.
        for choice in args:
            if value == choice or (isinstance(choice, str) and str(value) == choice):
                return choice
        raise ValueError(f'expected one of {", ".join(map(repr, args))}, got {value!r}')
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise TypeError(f'expected a list, got {value!r}')
        item_hint = args[0] if args else Any
        items = [_convert(item, item_hint) for item in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise TypeError(f'expected a mapping, got {value!r}')
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f'expected true or false, got {value!r}')
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'expected an integer, got {value!r}')
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f'expected a number, got {value!r}')
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f'expected a string, got {value!r}')
        return value
    if hint is Path:
        if not isinstance(value, str | os.PathLike):
            raise TypeError(f'expected a path, got {value!r}')
        return Path(value)
    return value
