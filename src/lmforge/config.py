"""Typed configuration: YAML in, flags and dotted overrides merged, validated, resolved out.

Every stage has one pydantic model (a `StageConfig`). Values come from three layers, later ones
winning: a YAML file (`--config`), the command's own flags, then repeatable `--set a.b=value`
overrides. Validation happens before any work and a mistake becomes one line that names the key,
the bad value and what is allowed (a ConfigError, exit code 2).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from lmforge.errors import ConfigError

__all__ = [
    "ConfigError",
    "Section",
    "StageConfig",
    "apply_overrides",
    "config_hash",
    "load_config",
    "load_yaml",
    "parse_override",
    "set_dotted",
    "to_yaml",
]

C = TypeVar("C", bound=BaseModel)

# Field(json_schema_extra=NOT_HASHED) marks settings that cannot change a stage's output (worker
# counts, progress display) so that changing them does not rerun the stage.
NOT_HASHED = {"hashed": False}
# Field(json_schema_extra=HASHED_IF_SET) marks a setting added later whose default reproduces the
# old output: hashed only when set away from its default, so existing cached results stay valid.
HASHED_IF_SET = {"hashed": "if_set"}


class Section(BaseModel):
    """Strict base for every config section: unknown keys are errors, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class StageConfig(Section):
    """Base of a stage's config: where it writes, and which paths its result depends on."""

    out: Path = Field(description="directory the stage writes its artifacts into")

    def inputs(self) -> list[Path]:
        """Paths whose content decides whether a cached result is still valid."""
        return []

    # built-in inputs (bytes from lmforge's code, no file of their own) the stage reads, each as
    # the "module:function" returning its versions, imported only when a cache key is taken
    version_sources: ClassVar[tuple[str, ...]] = ()

    def input_versions(self) -> dict[str, str]:
        """Versions of built-in inputs whose bytes come from lmforge's code (the stdlib-docs
        corpus), by name: like inputs(), a changed value invalidates a cached result. Those of
        version_sources, merged; a stage whose inputs follow its settings overrides this."""
        versions: dict[str, str] = {}
        for source in self.version_sources:
            versions |= _version_source(type(self), source)()
        return versions


def _version_source(owner: type, source: str) -> Callable[[], dict[str, str]]:
    """The function a version_sources entry names; ImportError naming the config class and the
    entry when it names none (a typo otherwise surfaces only when a cache key is taken, as a
    bare ModuleNotFoundError, or AttributeError: '' for an entry without its colon)."""
    module, colon, function = source.partition(":")
    try:
        if not (module and colon and function):
            raise ValueError("not of the form 'module:function'")
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(f"{owner.__name__}.version_sources: {source!r}: {err}") from err


STDLIB_DOCS_VERSIONS = "lmforge.data.stdlib_docs:corpus_versions"  # the built-in corpus's


def load_yaml(path: Path) -> dict[str, Any]:
    """Reads a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Splits `a.b=value`; the value is read as YAML so numbers, bools and lists keep their type."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets data[a][b] = value for key 'a.b', creating intermediate mappings."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Returns base with extra merged in; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies `--set` overrides to a plain dict (before validation)."""
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return data


def load_config(
    cls: type[C],
    *,
    file: Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> C:
    """Builds a validated config from a YAML file, explicit values and dotted overrides."""
    data: dict[str, Any] = load_yaml(file) if file else {}
    data = deep_merge(data, {k: v for k, v in (values or {}).items() if v is not None})
    apply_overrides(data, overrides)
    return validate(cls, data)


def validate(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """Validates data into cls, turning the first pydantic error into one actionable line."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe_error(cls, exc, where)) from None


def describe_error(cls: type[BaseModel], exc: ValidationError, where: str = "") -> str:
    """One line: the dotted key, the offending value and what is allowed."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = ".".join(loc) or "<config>"
    prefix = f"{where}: " if where else ""
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_fields_at(cls, loc[:-1])))
        return f"{prefix}unknown key '{key}' (allowed here: {allowed})"
    if err["type"] == "missing":
        desc = _field_description(cls, loc)
        hint = f" ({desc})" if desc else ""
        return f"{prefix}missing required key '{key}'{hint}"
    value = err.get("input")
    if isinstance(value, dict):  # a section-level rule: the message names the keys involved
        return f"{prefix}bad value in '{key}': {err['msg']}"
    return f"{prefix}bad value for '{key}': {value!r}: {err['msg']}"


def _walk(cls: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    parts = iter(loc)
    for part in parts:
        field = cls.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if get_origin(ann) is dict:  # a mapping of sections: the next part is its key
            ann = get_args(ann)[1] if next(parts, None) is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    section = _walk(cls, loc)
    return list(section.model_fields) if section else []


def _field_description(cls: type[BaseModel], loc: list[str]) -> str:
    section = _walk(cls, loc[:-1])
    field = section.model_fields.get(loc[-1]) if section and loc else None
    return (field.description or "") if field else ""


def hashed_dump(cfg: BaseModel) -> dict[str, Any]:
    """The config as JSON-able data without `out`, fields marked NOT_HASHED, and fields marked
    HASHED_IF_SET that hold their default."""

    def strip(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
        for name, field in type(model).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            value = getattr(model, name)
            if extra.get("hashed") is False or (
                extra.get("hashed") == "if_set" and value == _default(field, model)
            ):
                data.pop(name, None)
                continue
            if isinstance(value, BaseModel) and isinstance(data.get(name), dict):
                data[name] = strip(value, data[name])
        return data

    data = strip(cfg, cfg.model_dump(mode="json"))
    data.pop("out", None)
    return data


def _default(field: FieldInfo, model: BaseModel) -> Any:
    """A field's default value, from its default_factory too (field.default is then unset)."""
    return field.get_default(call_default_factory=True, validated_data=dict(model))


def config_hash(cfg: BaseModel) -> str:
    """Stable hash of what a config means for the output (see hashed_dump)."""
    canonical = json.dumps(hashed_dump(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, written beside every stage's output."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the source of docs and --help."""
    rows: list[tuple[str, str, str]] = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, prefix=f"{key}."))
        else:
            default = (
                "" if field.is_required() else repr(field.get_default(call_default_factory=True))
            )
            rows.append((key, default, field.description or ""))
    return rows
