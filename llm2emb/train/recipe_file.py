"""Reading a training recipe: one YAML file, validated completely before any model or data loads.

Every error names its key path (`stages[1].datasets[0].path: file not found`) and, when the key came from the file,
the file and line, found by composing the YAML node tree. `--set key.path=value` overrides are applied to the raw
mapping before validation, so they get the same checks. Stage keys left out inherit from the previous stage (NV-Embed's
second stage usually changes only its data), and the resolved recipe that is saved next to the run spells every
inherited value out. The schema itself is `llm2emb.train.recipe`.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llm2emb.errors import UserError
from llm2emb.files import write_text_atomic
from llm2emb.train.recipe import NOT_INHERITED, RESOLVED_NAME, KeyPathError, Recipe, StageSpec


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem raises one UserError listing them all."""
    path = Path(path)
    data, node = read_yaml(path, f"{path}: recipe file not found")
    lines = key_lines(node)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping with model, output_dir and stages")
    overridden = set()
    for item in overrides:
        overridden.update(apply_override(data, item))
    return validate_recipe(data, base_dir=path.parent, source=path, lines=lines, overridden=overridden)


def read_yaml(path: Path, missing: str) -> tuple[Any, yaml.Node | None]:
    """A YAML file's value and its node tree (for key lines); `missing` when there is no file, `file:line` when it
    does not parse."""
    if not path.is_file():
        raise UserError(missing)
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def validate_recipe(
    data: dict,
    base_dir: str | Path = ".",
    source: str | Path = "<recipe>",
    lines: dict[tuple, int] | None = None,
    overridden: set[tuple] = frozenset(),
) -> Recipe:
    """Validate a raw mapping; errors name key paths, with `source:line` where the line is known."""
    data = copy.deepcopy(data)
    inherited = inherit_stage_keys(data)
    raw = copy.deepcopy(data)
    try:
        return Recipe.model_validate(data, context={"base_dir": Path(base_dir).resolve()})
    except ValidationError as exc:
        messages = [_format_error(err, raw, source, lines or {}, overridden, inherited) for err in exc.errors()]
        raise UserError("; ".join(dict.fromkeys(messages))) from None  # every problem, on one line


def inherit_stage_keys(data: Any) -> dict[tuple, tuple]:
    """Fill each stage's missing training keys from the stage before; returns {inherited path: origin path}."""
    stages = data.get("stages") if isinstance(data, dict) else None
    inherited: dict[tuple, tuple] = {}
    if not isinstance(stages, list):
        return inherited
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        previous = stages[index - 1] if index and isinstance(stages[index - 1], dict) else {}
        for key, value in previous.items():
            if key in StageSpec.model_fields and key not in NOT_INHERITED and key not in stage:
                stage[key] = copy.deepcopy(value)
                origin = inherited.get(("stages", index - 1, key), ("stages", index - 1, key))
                inherited[("stages", index, key)] = origin
        stage.setdefault("name", f"stage{index}")
    return inherited


def _format_error(
    err: dict, raw: Any, source: Any, lines: dict[tuple, int], overridden: set[tuple], inherited: dict[tuple, tuple]
) -> str:
    loc = _clean_loc(err["loc"], raw)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "missing", "extra_forbidden") and isinstance(err.get("input"), (int, float, str)):
        message += f" (got {err['input']!r})"
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, KeyPathError):
        loc = loc + ctx_error.key
        message = ctx_error.message
    elif err["type"] == "extra_forbidden":
        message = "unknown key"
        siblings = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    elif err["type"] == "missing":
        message = "missing required key"
    where = str(source)
    key_path = format_key_path(loc) or "<top>"
    origin = inherited.get(loc[:3])
    if origin is not None:
        key_path += f" (inherited from {format_key_path(origin)})"
        loc = origin + loc[3:]
    if any(loc[: len(key)] == key for key in overridden):
        where += " (--set)"
    else:
        line = _nearest_line(loc, lines)
        if line is not None:
            where += f":{line}"
    return f"{where}: {key_path}: {message}"


def _clean_loc(loc: tuple, raw: Any) -> tuple:
    """Drop pydantic's union-member tags (`str`, `function-after[...]`) that are not keys of the data."""
    kept: list = []
    node = raw
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(node, dict) and part in node:
            kept.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(part)
            node = node[part]
        elif last and isinstance(node, dict) and isinstance(part, str) and not _is_tag(part):
            kept.append(part)
        else:
            node = None if not _is_tag(str(part)) else node
    return tuple(kept)


def _is_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[str]", "dict[str,any]"} or "[" in part or "-" in part


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _nearest_line(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def format_key_path(loc: tuple) -> str:
    """('stages', 1, 'datasets', 0, 'path') -> 'stages[1].datasets[0].path'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_key_path(text: str, label: str | None = None) -> tuple:
    """'stages[1].max_steps' or 'stages.1.max_steps' -> ('stages', 1, 'max_steps'); `label` starts its errors."""
    label = label or f"--set {text}"
    parts: list = []
    for piece in re.split(r"\.|(?=\[)", text):
        if not piece:
            raise UserError(f"{label}: empty key in the key path")
        index = re.fullmatch(r"\[(\d+)\]", piece)
        if index:
            parts.append(int(index.group(1)))
        elif piece.isdigit():
            parts.append(int(piece))
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", piece):
            parts.append(piece)
        else:
            raise UserError(f"{label}: {piece!r} is not a key or a list index")
    return tuple(parts)


def apply_override(data: dict, item: str) -> list[tuple]:
    """Apply `key.path=value` (value read as YAML), or `@FILE`, a YAML mapping of such key paths to values (the
    overrides a setting shares, such as the data paths of one machine), to the raw mapping; returns the key paths
    set. Relative paths in either are taken from the recipe's folder, as the recipe's own are."""
    if item.startswith("@"):
        return override_file(data, Path(item[1:]).expanduser())
    key_text, sep, value_text = item.partition("=")
    if not sep or not key_text.strip():
        raise UserError(f"--set {item}: expected key.path=value or @FILE")
    key = parse_key_path(key_text.strip())
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise UserError(f"--set {item}: value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    set_key(data, key, value, f"--set {item}")
    return [key]


def override_file(data: dict, path: Path) -> list[tuple]:
    """Every `key.path: value` of an overrides file, in its order; errors name the file and line."""
    overrides, node = read_yaml(path, f"--set @{path}: overrides file not found")
    if not isinstance(overrides, dict):
        raise UserError(f"{path}: an overrides file is a mapping of key paths to values (stages[0].max_steps: 10)")
    lines = {key_node.value: key_node.start_mark.line + 1 for key_node, _ in node.value}
    keys = []
    for key_text, value in overrides.items():
        label = f"{path}:{lines.get(key_text, 1)}: {key_text}"
        key = parse_key_path(str(key_text), label)
        set_key(data, key, value, label)
        keys.append(key)
    return keys


def set_key(data: dict, key: tuple, value: Any, label: str) -> None:
    """Put `value` at key path `key` of the raw mapping, creating mappings on the way; `label` starts its errors."""
    node: Any = data
    for position, part in enumerate(key[:-1]):
        where = format_key_path(key[: position + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise UserError(f"{label}: {where}: index {part} out of range ({size} items)")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise UserError(f"{label}: {format_key_path(key[:position]) or '<top>'} is not a mapping")
            node = node.setdefault(part, {})
    last = key[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise UserError(f"{label}: {format_key_path(key)}: index out of range")
    elif not isinstance(node, dict):
        raise UserError(f"{label}: {format_key_path(key[:-1]) or '<top>'} is not a mapping")
    node[last] = value


def key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every key path of a composed YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            lines[path] = item.start_mark.line + 1
            lines.update(key_lines(item, path))
    return lines


def save_resolved(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """Write the fully resolved recipe (absolute paths, inherited keys spelled out) into the run folder."""
    directory = Path(output_dir or recipe.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(directory / RESOLVED_NAME,
                             yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
