"""Dataclasses to and from JSON, and the JSON Schema of their type hints: the machinery under report.json's types
(compiler/core/report_types.py), kept apart so the types read as a plain list of fields.

Rules a class follows (all of them kw_only dataclasses deriving from Section):
- a field without a default is always written (null where its type allows None);
- a field whose default is None is written only when set, as report.json always did (readers test `"key" in d`);
- keys a class does not declare are kept in `extra` and written back; the schema forbids them unless the class
  sets OPEN = True (sections whose keys belong to someone else: a step's report, a target's lowering info).
"""

from __future__ import annotations

import dataclasses
import enum
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

# report.json writes NaN and infinities as these strings (JSON has no such numbers)
NONFINITE = ("nan", "inf", "-inf")


@dataclass(kw_only=True)
class Section:
    """Base of every typed section: its undeclared keys (kept, written back, checked by the schema)."""

    OPEN: ClassVar[bool] = False
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, metadata={"extra": True})

    @classmethod
    def from_dict(cls, d: Any, partial: bool = False):
        """The typed object of a JSON dict. partial=True (a reader of files other processes wrote, which may
        be old, hand-made or cut short): a missing or mistyped value reads as None instead of raising."""
        return _load(cls, d, cls.__name__, partial)

    def to_dict(self) -> Dict[str, Any]:
        return _dump(self)


class TypedJSONError(ValueError):
    """A value that does not fit its declared type; the message names the key path."""


def _fields(cls) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("extra")]


def _hints(cls) -> Dict[str, Any]:
    return get_type_hints(cls)


def _is_optional(tp) -> bool:
    return _origin(tp) is Union and type(None) in get_args(tp)


def _origin(tp):
    o = get_origin(tp)
    return Union if o is types.UnionType else o


def _strip_none(tp):
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else Union[tuple(args)]


def _omit_when_none(f: dataclasses.Field) -> bool:
    return f.default is None


def _load(tp, v, path: str, partial: bool = False):
    if not partial:
        return _load_strict(tp, v, path)
    try:
        return _load_strict(tp, v, path, partial=True)
    except TypedJSONError:
        return None


def _load_strict(tp, v, path: str, partial: bool = False):
    if tp is Any:
        return v
    if _is_optional(tp):
        return None if v is None else _load(_strip_none(tp), v, path, partial)
    o = _origin(tp)
    if o in (list, List):
        if not isinstance(v, list):
            raise TypedJSONError(f"{path}: expected a list, got {type(v).__name__}")
        (item,) = get_args(tp) or (Any,)
        return [_load(item, x, f"{path}[{i}]", partial) for i, x in enumerate(v)]
    if o in (dict, Dict):
        if not isinstance(v, dict):
            raise TypedJSONError(f"{path}: expected an object, got {type(v).__name__}")
        _, item = get_args(tp) or (str, Any)
        return {str(k): _load(item, x, f"{path}.{k}", partial) for k, x in v.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(v)
        except ValueError:
            raise TypedJSONError(f"{path}: {v!r} is not one of {', '.join(repr(e.value) for e in tp)}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise TypedJSONError(f"{path}: expected an object, got {type(v).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in _fields(tp):
            if f.name in v:
                kwargs[f.name] = _load(hints[f.name], v[f.name], f"{path}.{f.name}", partial)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if not partial:
                    raise TypedJSONError(f"{path}: missing {f.name!r}")
                kwargs[f.name] = None
        known = {f.name for f in _fields(tp)}
        return tp(**kwargs, extra={k: x for k, x in v.items() if k not in known})
    if tp is float:
        if isinstance(v, bool) or not (isinstance(v, (int, float)) or v in NONFINITE):
            raise TypedJSONError(f"{path}: expected a number, got {v!r}")
        return float(v)
    if tp in (int, str, bool):
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise TypedJSONError(f"{path}: expected {tp.__name__}, got {v!r}")
        return v
    raise TypeError(f"{path}: type {tp!r} is not supported by compiler.core.typed_json")


def _dump(v):
    if isinstance(v, Section):
        out = {}
        for f in _fields(type(v)):
            x = getattr(v, f.name)
            if x is None and _omit_when_none(f):
                continue
            out[f.name] = _dump(x)
        out.update({k: x for k, x in v.extra.items() if k not in out})
        return out
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, dict):
        return {str(k): _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


def json_schema(tp, defs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a type hint; dataclasses go into defs and are referenced by name."""
    if tp is Any:
        return {}
    if _is_optional(tp):
        return {"anyOf": [json_schema(_strip_none(tp), defs), {"type": "null"}]}
    o = _origin(tp)
    if o is Union:
        return {"anyOf": [json_schema(a, defs) for a in get_args(tp)]}
    if o in (list, List):
        (item,) = get_args(tp) or (Any,)
        return {"type": "array", "items": json_schema(item, defs)}
    if o in (dict, Dict):
        _, item = get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": json_schema(item, defs)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [e.value for e in tp]}
    if dataclasses.is_dataclass(tp):
        defs = {} if defs is None else defs
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder: recursion
            hints = _hints(tp)
            props, required = {}, []
            for f in _fields(tp):
                hint = hints[f.name]
                if _omit_when_none(f) and _is_optional(hint):
                    hint = _strip_none(hint)  # never written as null: absent instead
                props[f.name] = json_schema(hint, defs)
                if f.metadata.get("doc"):
                    props[f.name]["description"] = f.metadata["doc"]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    required.append(f.name)
            doc = (tp.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            defs[name] = {"type": "object", "description": doc, "properties": props, "required": required,
                          "additionalProperties": bool(tp.OPEN)}
        return {"$ref": f"#/$defs/{name}"}
    if tp is float:
        return {"anyOf": [{"type": "number"}, {"enum": list(NONFINITE)}]}
    if tp is int:
        return {"type": "integer"}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    raise TypeError(f"type {tp!r} is not supported by compiler.core.typed_json")


def document_schema(root, title: str, version: int) -> Dict[str, Any]:
    """The whole document's schema: root's definition inlined at the top, the others under $defs."""
    defs: Dict[str, Any] = {}
    json_schema(root, defs)
    top = defs.pop(root.__name__)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
            "$comment": f"generated from {root.__module__}.{root.__name__} (schema_version {version}); "
                        "regenerate with `python -m compiler.core.report_types > docs/report.schema.json`",
            **top, "$defs": dict(sorted(defs.items()))}

