"""YAML in, YAML out, `a.b=value` overrides, and error reports that list every problem at once."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmopt.config._errors import ConfigError, ConfigIssue
from llmopt.config._schema import RunConfig
from llmopt.config._templates import resolve_template


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section class at a location path, to suggest field names."""
    model: type[BaseModel] | None = RunConfig
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _issue_from_error(error: Mapping[str, Any]) -> list[ConfigIssue]:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = sorted(parent.model_fields) if parent else []
        unknown = str(loc[-1])
        close = difflib.get_close_matches(unknown, known, n=1) or [
            k for k in known if unknown.startswith(k) or k.startswith(unknown)
        ]
        hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(known)}"
        return [ConfigIssue(path, f"unknown field; {hint}")]
    message = str(error["msg"])
    if message.startswith("Value error, "):
        # Cross-field errors already name their fields and the fix; one issue per line.
        return [ConfigIssue(path, line) for line in message.removeprefix("Value error, ").split("\n")]
    if kind != "missing" and "input" in error and not isinstance(error["input"], (dict, list)):
        message += f" (got {error['input']!r})"
    return [ConfigIssue(path, message)]


def issues_from_validation(exc: ValidationError) -> list[ConfigIssue]:
    """Turn a pydantic ValidationError into config issues with dotted field paths."""
    return [issue for error in exc.errors() for issue in _issue_from_error(error)]


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([ConfigIssue("", f"override {text!r} is not of the form a.b=value")])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([ConfigIssue("", f"override {text!r} has an empty key part; write a.b=value")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(key, f"override value {raw!r} is not valid YAML: {exc}")]) from exc
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested mapping, in place.

    Args:
        data: The raw config mapping.
        overrides: Strings like `training.lr=1e-3` or `lora.target_modules=[q_proj,v_proj]`.

    Returns:
        The same mapping, updated.
    """
    for text in overrides:
        parts, value = _parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, bool):  # a section's short form (`adaptive_batching: true`) keeps its switch
                child = {"enabled": child}
                node[part] = child
            elif not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning syntax errors into a ConfigError with the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([ConfigIssue("", f"config file {str(path)!r} does not exist")])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"invalid YAML: {exc}")], source=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"the top level must be a mapping, got {type(data).__name__}")], source=str(path)
        )
    return data


def validate_config(data: Mapping[str, Any], source: str | None = None) -> RunConfig:
    """Validate a raw mapping into a RunConfig, resolving a `template:` key first.

    Raises:
        ConfigError: listing every problem found.
    """
    data = resolve_template(dict(data), source)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc), source=source) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a run config from YAML (or defaults when `path` is None) and apply overrides.

    Args:
        path: YAML file; may start from a template with `template: small_model`.
        overrides: `a.b=value` strings applied after the file.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem at once, each with its field path and the fix.
    """
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return validate_config(data, source=str(path) if path is not None else None)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (prompt templates) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_config(config: RunConfig, path: str | Path | None = None) -> str:
    """Serialize a config to YAML (every field, defaults included); write it when `path` is given."""
    text = yaml.dump(config.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text
