"""Conversion between attrs value objects and JSON-shaped mappings.

Every OISP object in :mod:`oisp.events` is a :class:`Record`: an ``attrs`` class whose fields map one to one to
JSON keys (``None`` means "not set" and is omitted), plus ``extra``, which keeps every key the model does not
know. Keeping unknown keys is what lets ``from_dict(x).to_dict() == x`` hold for events other collectors
produce. cattrs was considered and not used: it has no notion of "collect unknown keys", which is the one thing
round-tripping foreign events needs, so its hooks would have been most of this module anyway.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar, Union, get_args, get_origin

import attrs

from oisp.errors import EventValidationError

__all__ = ["Record", "extra_field", "json_key"]

R = TypeVar("R", bound="Record")
_Structurer = Callable[[Any, str], Any]

JSON_KEY = "oisp_json_key"


def json_key(key: str, **kwargs: Any) -> Any:
    """An ``attrs.field`` whose JSON key differs from its attribute name (``$redacted``)."""
    metadata = dict(kwargs.pop("metadata", {}))
    metadata[JSON_KEY] = key
    kwargs.setdefault("default", None)
    return attrs.field(metadata=metadata, **kwargs)


def extra_field() -> Any:
    """The ``extra`` field every record ends with: keys of the JSON object the model does not name."""
    return attrs.field(factory=dict, repr=False)


class Record:
    """Mixin for attrs classes that are JSON objects of the OISP model.

    Subclasses are ``@attrs.frozen(kw_only=True)`` classes whose last field is ``extra``.
    """

    _plan: ClassVar[tuple[tuple[str, str, _Structurer], ...] | None] = None
    _to_dict_function: ClassVar[Callable[[Any], dict[str, Any]] | None] = None
    extra: dict[str, Any]

    @classmethod
    def _structure_plan(cls) -> tuple[tuple[str, str, _Structurer], ...]:
        plan = cls.__dict__.get("_plan")
        if plan is None:
            fields = attrs.fields(cls)  # type: ignore[arg-type]
            module_globals = vars(sys.modules[cls.__module__])
            plan = tuple(
                (a.name, a.metadata.get(JSON_KEY, a.name), _structurer_for(_resolve(a.type, module_globals)))
                for a in fields
                if a.name != "extra" and a.init
            )
            cls._plan = plan
        return plan

    @classmethod
    def _unstructurer(cls) -> Callable[[Any], dict[str, Any]]:
        """The class's compiled ``to_dict`` body: one straight-line function per class, made on first use."""
        function = cls.__dict__.get("_to_dict_function")
        if function is None:
            function = _compile_to_dict(cls, cls._structure_plan())
            cls._to_dict_function = function
        return function

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> Self:
        """Build the object from a JSON-shaped mapping; keys the model does not know go to ``extra``."""
        return cls._from_mapping(mapping, {})

    @classmethod
    def _from_mapping(cls, mapping: Mapping[str, Any], overrides: dict[str, Any]) -> Self:
        """``from_dict``, with the keys in ``overrides`` already structured by the caller."""
        if not isinstance(mapping, Mapping):
            raise EventValidationError(f"{cls.__name__}: expected a JSON object, got {type(mapping).__name__}")
        values: dict[str, Any] = {}
        known: set[str] = set()
        for name, key, structure in cls._structure_plan():
            known.add(key)
            if key in overrides:
                values[name] = overrides[key]
            elif key in mapping and mapping[key] is not None:
                values[name] = structure(mapping[key], f"{cls.__name__}.{key}")
        extra = {k: v for k, v in mapping.items() if k not in known}
        try:
            return cls(**values, extra=extra)  # type: ignore[call-arg]
        except TypeError as exc:  # a required field is missing
            raise EventValidationError(f"{cls.__name__}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-shaped mapping of this object, unset (``None``) fields omitted, ``extra`` keys kept."""
        return self._unstructurer()(self)


def _compile_to_dict(cls: type, plan: tuple[tuple[str, str, _Structurer], ...]) -> Callable[[Any], dict[str, Any]]:
    """A ``to_dict`` for ``cls`` without a loop over its fields: each field is read, and plain JSON scalars are
    stored as they are, everything else through :func:`unstructure` (which is what the generic loop did)."""
    lines = ["def to_dict(self):", "    out = {}"]
    for name, key, _ in plan:
        lines += [
            f"    value = self.{name}",
            "    if value is not None:",
            f"        out[{key!r}] = value if type(value) in _SCALARS else unstructure(value)",
        ]
    lines += [
        "    extra = self.extra",
        "    if extra:",
        "        for key, value in extra.items():",
        "            if key not in out:",
        "                out[key] = unstructure(value)",
        "    return out",
    ]
    namespace: dict[str, Any] = {"_SCALARS": _SCALARS, "unstructure": unstructure}
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from the class's own field names
    function: Callable[[Any], dict[str, Any]] = namespace["to_dict"]
    function.__qualname__ = f"{cls.__qualname__}.to_dict"
    return function


#: Types whose values are their own JSON form (subclasses, such as enums, take the general way).
_SCALARS = frozenset({str, int, float, bool})


def _resolve(annotation: Any, module_globals: dict[str, Any]) -> Any:
    if isinstance(annotation, str):
        return eval(annotation, module_globals)  # noqa: S307 - our own annotations, PEP 563 strings
    return annotation


def unstructure(value: Any) -> Any:
    """Turn records (and containers of them) into plain JSON values."""
    kind = type(value)
    if kind in _SCALARS or value is None:
        return value
    if kind is list:
        return [v if type(v) in _SCALARS else unstructure(v) for v in value]
    if kind is dict:
        return {k: v if type(v) in _SCALARS else unstructure(v) for k, v in value.items()}
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [unstructure(v) for v in value]
    if isinstance(value, dict):
        return {k: unstructure(v) for k, v in value.items()}
    return value


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Record)


def _structurer_for(tp: Any) -> _Structurer:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [m for m in get_args(tp) if m is not type(None)]
        records = [m for m in members if _is_record(m)]
        if len(members) == 1:
            return _structurer_for(members[0])
        if records:
            record = records[0]

            def structure_union(value: Any, where: str) -> Any:
                if isinstance(value, Mapping) and _accepts(record, value):
                    return record.from_dict(value)
                return value

            return structure_union
        return _passthrough
    if _is_record(tp):
        record_type: type[Record] = tp

        def structure_record(value: Any, where: str) -> Any:
            if not isinstance(value, Mapping):
                raise EventValidationError(f"{where}: expected a JSON object, got {type(value).__name__}")
            return record_type.from_dict(value)

        return structure_record
    if origin is list:
        (item_type,) = get_args(tp) or (Any,)
        item = _structurer_for(item_type)

        def structure_list(value: Any, where: str) -> Any:
            if not isinstance(value, list | tuple):
                raise EventValidationError(f"{where}: expected a JSON array, got {type(value).__name__}")
            return [item(v, where) for v in value]

        return structure_list
    if origin is dict:
        return _copy_dict
    return _passthrough


def _accepts(record: type[Record], value: Mapping[str, Any]) -> bool:
    """Whether ``value`` is meant as ``record`` in a union: it carries every key the record requires."""
    required = [
        a.metadata.get(JSON_KEY, a.name)
        for a in attrs.fields(record)  # type: ignore[arg-type]
        if a.default is attrs.NOTHING and a.name != "extra"
    ]
    return all(k in value for k in required)


def _passthrough(value: Any, where: str) -> Any:
    return value


def _copy_dict(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise EventValidationError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return dict(value)
