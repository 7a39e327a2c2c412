"""The one options schema: small validated dataclasses whose fields carry their help text and choices.

From one schema come the argparse options of every command (`add_arguments`), the values read back
(`from_args`), the equivalent command line of a result (`command_line`) and the app's option widgets (which read
`fields_of` for labels, help and choices). Choices come from the registries (methods, output functions, timestep
strategies, projectors), so the CLI and the app cannot offer something the library rejects.

    @dataclass(frozen=True)
    class Example:
        k: int = field(default=4096, metadata=opt("k, the projection dimension", flag="--proj-dim"))

Field metadata (`opt`): help (one line), flag (default --field-name), choices (a tuple or a zero-argument
callable that returns one, evaluated when needed), parse (how the command line's text becomes the value, for a
field that is not a plain int, float or string: "0,5,9" -> (0, 5, 9); default the field's type), required,
run_only (how to compute, not what: cache folders, batch size, device; left out of the equivalent command line),
label (the app's widget label), noun (what an error calls the value: "unknown projector 'x'"), applies (the kind
of method the option means something to, e.g. "gradients": a schema refuses it, set, for a method of another kind;
`not_applicable`). A schema that refuses
values outside their choices itself (`validate`, from its `__post_init__`) gets one-line errors instead of
argparse's usage message: `add_arguments(..., argparse_choices=False)`.
"""

from __future__ import annotations

import argparse
import shlex
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields, replace
from typing import Any

from .errors import ConfigError


def opt(help: str, *, flag: str | None = None, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
        required: bool = False, run_only: bool = False, metavar: str | None = None, label: str | None = None,
        noun: str | None = None, applies: str | None = None, parse: Callable[[str], Any] | None = None) -> dict:
    """Metadata for a schema field (see the module docstring)."""
    return {"help": help, "flag": flag, "choices": choices, "required": required, "run_only": run_only,
            "metavar": metavar, "label": label, "noun": noun, "applies": applies, "parse": parse}


@dataclass(frozen=True)
class OptionSpec:
    """One field of a schema, as the CLI and the app see it."""

    name: str
    flag: str
    help: str
    type: Callable[[str], Any]  # the command line's text -> the value: int, float, str, bool or the field's `parse`
    default: Any
    choices: tuple[str, ...] | None
    required: bool
    run_only: bool
    metavar: str | None
    label: str  # the app's widget label (default: the name, capitalised)
    noun: str  # what errors call a value of it (default: the name in words)
    applies: str | None = None  # the kind of method it applies to (None: every one); see `not_applicable`

    @property
    def optional(self) -> bool:
        """Whether None is a valid value (the option may be left unset)."""
        return self.default is None


PLAIN_TYPES = (int, float, str, bool)  # what argparse converts itself; other fields name their `parse`


def _base_type(annotation) -> type:
    """int for `int`, `int | None` and "int | None" annotations (postponed annotations are strings)."""
    if isinstance(annotation, str):
        names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
        return {"int": int, "float": float, "str": str, "bool": bool}[names[0]]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def fields_of(schema) -> list[OptionSpec]:
    """The option specs of a schema class (or instance), in declaration order."""
    out = []
    for f in fields(schema):
        meta = f.metadata
        if "help" not in meta:
            continue
        choices = meta.get("choices")
        if callable(choices):
            choices = choices()
        out.append(OptionSpec(f.name, meta.get("flag") or "--" + f.name.replace("_", "-"), meta["help"],
                              meta.get("parse") or _base_type(f.type), _default(f), tuple(choices) if choices else None,
                              meta.get("required", False), meta.get("run_only", False), meta.get("metavar"),
                              meta.get("label") or f.name.replace("_", " ").capitalize(),
                              meta.get("noun") or f.name.replace("_", " "), meta.get("applies")))
    return out


def not_applicable(schema, groups: set[str], values: dict[str, Any] | None = None) -> list[OptionSpec]:
    """The fields of `schema` that apply only to a kind of method outside `groups` (their `applies`) and whose
    value (from `values`, else the instance's) is not their default: options given to a method that cannot use
    them."""
    out = []
    for spec in fields_of(schema):
        if spec.applies is None or spec.applies in groups:
            continue
        value = values.get(spec.name, spec.default) if values is not None else getattr(schema, spec.name)
        if value != spec.default:
            out.append(spec)
    return out


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_arguments(parser: argparse.ArgumentParser, schema, exclude: Sequence[str] = (),
                  only: Sequence[str] | None = None, argparse_choices: bool = True,
                  defaults: dict[str, Any] | None = None, required: Sequence[str] = ()) -> None:
    """Add one argparse option per schema field (those in `only` if given, except `exclude`). With
    `argparse_choices=False` the choices are shown but not enforced by argparse: the schema refuses a value
    outside them itself, in one line (`validate`). `defaults` and `required`: this command's own defaults and
    required options where they differ from the schema's (train-lora: fewer epochs, a lower learning rate, a
    pipeline)."""
    for spec in fields_of(schema):
        if spec.name in exclude or (only is not None and spec.name not in only):
            continue
        if spec.name in (defaults or {}):
            spec = replace(spec, default=defaults[spec.name])
        if spec.name in required:
            spec = replace(spec, required=True)
        kwargs: dict[str, Any] = {"dest": spec.name, "help": _help(spec).replace("%", "%%")}  # argparse formats %
        if spec.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = spec.default
        else:
            # a field's own `parse` runs in `from_args`, where its one-line error is the command's (not argparse's)
            kwargs.update(type=spec.type if spec.type in PLAIN_TYPES else str, default=spec.default,
                          required=spec.required)
            if spec.choices and argparse_choices:
                kwargs["choices"] = spec.choices
            elif spec.choices:
                kwargs["metavar"] = "{" + ",".join(spec.choices) + "}"
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        parser.add_argument(spec.flag, **kwargs)


def _help(spec: OptionSpec) -> str:
    text = spec.help
    shown = spec.default is not None and spec.default is not False and spec.default != ""  # (0 is shown)
    if shown and not spec.required and spec.type in PLAIN_TYPES:
        text += f" (default {spec.default})"
    return text


def from_args(schema: type, args: argparse.Namespace, **overrides):
    """An instance of `schema` from parsed arguments (fields absent from `args` keep their defaults; a field with
    its own `parse` is parsed here: a bad value is one line)."""
    values = {f.name: getattr(args, f.name) for f in fields(schema) if hasattr(args, f.name)}
    for spec in fields_of(schema):
        if spec.type not in PLAIN_TYPES and isinstance(values.get(spec.name), str):
            values[spec.name] = spec.type(values[spec.name])
    values.update(overrides)
    return schema(**values)


def command_line(command: str, options: Sequence[Any], extra: Sequence[tuple[str, Any]] = (),
                 exclude: Sequence[str] = ()) -> str:
    """`python -m attribution COMMAND --flag value ...` for schema instances: every field that is set, not
    run-only and not in `exclude` (defaults included, so the line does not depend on future defaults), then
    `extra` (flag, value) pairs; shell-quoted."""
    parts = ["python", "-m", "attribution", command]
    for instance in options:
        for spec in fields_of(instance):
            value = getattr(instance, spec.name)
            if spec.run_only or value is None or spec.name in exclude:
                continue
            if spec.type is bool:
                parts.append(spec.flag if value else "--no-" + spec.flag[2:])
            else:
                parts += [spec.flag, _format(value)]
    for flag, value in extra:
        if value is not None:
            parts += [flag, _format(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _format(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def validate(instance) -> None:
    """Refuse, in one line, a field whose value is outside its choices (call it from a schema's
    `__post_init__`)."""
    for spec in fields_of(instance):
        if spec.choices:
            check_choice(spec.noun, getattr(instance, spec.name), spec.choices)


def check_choice(name: str, value: str | None, choices: Sequence[str]) -> None:
    """The one-line refusal of a value outside its choices (for values that did not come through argparse)."""
    if value is not None and value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; use one of: {', '.join(choices)}")
