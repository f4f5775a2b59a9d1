"""Command-line flags generated from the data, so that no second list has to be kept in step.

Two generators, one vocabulary (``field_name`` -> ``--field-name``, the value's type from its
annotation):

- :func:`add_setting_flags`: the scaling settings of the registry (:data:`yarn_rope.methods.SETTINGS`;
  the type from :class:`~yarn_rope.RopeScaling`'s annotation, the help from ``Setting.doc``), used by
  every command that takes scaling settings; :func:`given_settings` reads them back.
- :func:`add_dataclass_flags`: every field of a dataclass (litgpt's way of turning a config into a
  command line: the default from the field, the help from the class docstring's ``Attributes:``
  entry), used for :class:`~yarn_rope.finetune.FinetuneRecipe`; :func:`dataclass_values` reads them
  back and :func:`flag_named_in` finds the flag an error message is about.

How text becomes a value (:func:`value_parser`): ``int``, ``float``, ``str``; ``bool`` as
``true``/``false`` (or a ``--flag`` / ``--no-flag`` pair for dataclass fields); ``tuple[X, ...]``
and ``tuple[X, X]`` as comma-separated values; ``X | None`` also takes ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from .. import methods as M

Parse = Callable[[str], Any]


def flag_name(name: str) -> str:
    """``original_max_position_embeddings`` -> ``--original-max-position-embeddings``."""
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------------
# Text -> value, from a type annotation
# ------------------------------------------------------------------------------------------------


def _optional_inner(annotation: Any) -> tuple[Any, bool]:
    """(``X``, True) for ``X | None``; (annotation, False) otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def truth(text: str) -> bool:
    """argparse type of a yes/no value: ``true``/``false`` (also ``1``/``0``, ``yes``/``no``)."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar(kind: Any) -> Parse:
    if kind is bool:
        return truth
    if kind in (int, float, str):
        return typing.cast(Parse, kind)
    raise TypeError(f"no command-line form for values of type {kind!r}")


_TYPE_WORDS = {int: "whole number", float: "number", str: "name"}


def _items(text: str, parse: Parse, size: int | None) -> tuple[Any, ...]:
    """``"0.9,0.95"`` -> ``(0.9, 0.95)``; ``size`` items exactly when given."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = tuple(parse(part) for part in parts)
    except (ValueError, argparse.ArgumentTypeError):
        values = None
    if values is None or (size is not None and len(values) != size):
        count = f"{size} " if size is not None else ""
        word = _TYPE_WORDS.get(parse, "value")  # type: ignore[call-overload]
        raise argparse.ArgumentTypeError(f"expected {count}{word}s separated by commas, got {text!r}")
    return values


def _none_or(parse: Parse, text: str) -> Any:
    return None if text.strip().lower() == "none" else parse(text)


def value_parser(annotation: Any) -> tuple[Parse, str]:
    """(argparse ``type=``, metavar) for values of ``annotation``.

    Raises:
        TypeError: an annotation with no command-line form (a dict, a nested dataclass).
    """
    inner, optional = _optional_inner(annotation)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        size = None if len(args) == 2 and args[1] is Ellipsis else len(args)
        item = _scalar(args[0])
        parse: Parse = functools.partial(_items, parse=item, size=size)
        one = {int: "N", float: "X"}.get(args[0], "A")
        metavar = f"{one},{one}" if size == 2 else f"{one},{one},..."
    else:
        parse = _scalar(inner)
        metavar = {bool: "true|false", int: "N", float: "X"}.get(inner, "NAME")
    if optional:
        parse = functools.partial(_none_or, parse)
    return parse, metavar


# ------------------------------------------------------------------------------------------------
# The scaling settings (the registry's SETTINGS)
# ------------------------------------------------------------------------------------------------


def _setting_annotations() -> dict[str, Any]:
    from ..config import RopeScaling

    return typing.get_type_hints(RopeScaling)


def add_setting_flags(
    parser: argparse._ActionsContainer,
    names: Iterable[str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    kinds: Mapping[str, Parse] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Add ``--name`` for each scaling setting in ``names`` (default: every entry of ``SETTINGS``).

    Args:
        parser: the (sub)command or argument group.
        names: setting names, in order (each must be in :data:`yarn_rope.methods.SETTINGS`).
        defaults: command-line defaults (default ``None``: "not given", the registry's own
            default applies); ``args.<name>`` holds the value.
        kinds: argparse ``type=`` replacing the one from the annotation (e.g. a stricter check).
        notes: text appended to the setting's ``doc`` in the help.

    A yes/no setting given alone (``--finetuned``) means true.
    """
    annotations = _setting_annotations()
    defaults, kinds, notes = defaults or {}, kinds or {}, notes or {}
    for name in M.SETTINGS if names is None else names:
        setting = M.SETTINGS[name]
        parse, metavar = value_parser(annotations.get(name, float))
        note = notes.get(name)
        extra: dict[str, Any] = {"nargs": "?", "const": True} if isinstance(setting.default, bool) else {}
        parser.add_argument(
            flag_name(name),
            type=kinds.get(name, parse),
            default=defaults.get(name),
            metavar=metavar,
            help=setting.doc + (f" ({note})" if note else ""),
            **extra,
        )


def given_settings(args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The scaling settings given on the command line (those not ``None``), by field name."""
    values = {name: getattr(args, name, None) for name in (M.SETTINGS if names is None else names)}
    return {name: value for name, value in values.items() if value is not None}


def given_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`given_settings` plus ``method`` when ``--method`` was given (checked: one line naming it)."""
    settings = given_settings(args)
    if getattr(args, "method", None) is not None:
        settings["method"] = M.check_method(args.method)
    return settings


# ------------------------------------------------------------------------------------------------
# A dataclass's fields (the fine-tuning recipe)
# ------------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"^(\s+)([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*):\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's entry in ``cls``'s docstring ``Attributes:`` section, first sentence, plain text.

    An entry for several names (``weight_decay, adam_betas: AdamW settings.``) documents each,
    prefixed with its name in words.
    """
    lines = (cls.__doc__ or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    entries: list[tuple[list[str], list[str]]] = []
    indent = None
    for line in lines[starts[0] + 1 :] if starts else []:
        match = _ENTRY.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            entries.append(([name.strip() for name in match.group(2).split(",")], [match.group(3)]))
        elif entries and line.strip() and len(line) - len(line.lstrip()) > (indent or 0):
            entries[-1][1].append(line.strip())
        else:
            break  # a blank line or the next section
    docs = {}
    for names, words in entries:
        text = _first_sentence(" ".join(words))
        for name in names:
            docs[name] = text if len(names) == 1 else f"{name.replace('_', ' ')}: {text}"
    return docs


def _first_sentence(text: str) -> str:
    text = text.replace("``", "").replace(":data:", "").replace(":class:", "").replace("`", "")
    end = re.search(r"\.(\s|$)", text)
    return text[: end.start()] if end else text


@dataclasses.dataclass(frozen=True)
class FieldFlags:
    """How :func:`add_dataclass_flags` spells a dataclass's fields.

    Attributes:
        flags: extra spellings per field; the first is the one named in errors
            (``{"learning_rate": ("--lr",)}``: ``--lr`` and ``--learning-rate`` both work).
        choices: allowed values per field (for a tuple field: of each item).
        help: help text replacing the docstring's entry.
        groups: help-section title -> field names; other fields go under ``rest``.
        rest: the help-section title of the fields no group names.
    """

    flags: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, Collection[str]] = dataclasses.field(default_factory=dict)
    help: Mapping[str, str] = dataclasses.field(default_factory=dict)
    groups: Mapping[str, Collection[str]] = dataclasses.field(default_factory=dict)
    rest: str = "options"

    def spellings(self, name: str) -> list[str]:
        """Every flag of field ``name``, the one named in errors first."""
        extra = list(self.flags.get(name, ()))
        return extra if flag_name(name) in extra else [*extra, flag_name(name)]


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_field(
    container: argparse._ActionsContainer,
    field: dataclasses.Field[Any],
    annotation: Any,
    spec: FieldFlags,
    doc: str,
) -> None:
    name = field.name
    default = field.default if field.default is not dataclasses.MISSING else None
    help_text = spec.help.get(name) or doc or name.replace("_", " ")
    choices = spec.choices.get(name)
    keywords: dict[str, Any] = {"dest": name, "default": default}
    if annotation is bool:
        shown = " (default: on)" if default else " (default: off)"
        keywords.update(action=argparse.BooleanOptionalAction, help=help_text + shown)
    else:
        parse, metavar = value_parser(annotation)
        if choices is not None:
            tuple_field = typing.get_origin(_optional_inner(annotation)[0]) is tuple
            metavar = ",".join(choices) if tuple_field else None  # type: ignore[assignment]
            if not tuple_field:
                keywords["choices"] = tuple(choices)
        shown = f" (default: {_default_text(default)})" if default is not None else ""
        keywords.update(type=parse, metavar=metavar, help=help_text + shown)
    container.add_argument(*spec.spellings(name), **keywords)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, spec: FieldFlags) -> dict[str, str]:
    """Add a flag for every field of the dataclass ``cls``; returns field -> the flag named in errors.

    ``args.<field>`` holds the value, the field's default when not given (read it back with
    :func:`dataclass_values`).

    Raises:
        TypeError: a field whose type has no command-line form.
    """
    annotations = typing.get_type_hints(cls)
    docs = field_docs(cls)
    sections = {title: parser.add_argument_group(title) for title in (*spec.groups, spec.rest)}
    named: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        title = next((t for t, names in spec.groups.items() if field.name in names), spec.rest)
        _add_field(sections[title], field, annotations[field.name], spec, docs.get(field.name, ""))
        named[field.name] = spec.spellings(field.name)[0]
    return named


def dataclass_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` read from ``args`` (as :func:`add_dataclass_flags` stored them)."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}


def flag_named_in(message: str, flags: Mapping[str, str]) -> str | None:
    """The flag of the first field named in ``message`` (a whole word: ``lora`` is not ``lora_rank``)."""
    found = []
    for name, flag in flags.items():
        match = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)
        if match:
            found.append((match.start(), flag))
    return min(found)[1] if found else None
