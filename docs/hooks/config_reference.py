"""MkDocs hook: the configuration reference, generated from the pydantic models that read
the configuration files (``tapestry.config``), so the page cannot drift from the code.

``docs/reference/configuration.md`` holds the marker ``<!-- config-reference -->``; this hook
replaces it with one table per TOML table of the consortium file and of the node file: each
key, its type and bounds, its default, and what it means (the field's docstring, which
pydantic keeps as its ``description``). Only ``tapestry.config`` is imported, which
never imports torch, so the docs build fast and without the training stack.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"
PAGE = "reference/configuration.md"
SERVICES = Path(__file__).resolve().parents[2] / "services"
# The bounds pydantic keeps in a field's metadata, and how the table writes them.
BOUNDS = {"ge": "≥ {}", "gt": "> {}", "le": "≤ {}", "lt": "< {}"}


def on_config(config: Any) -> Any:
    """Document the tree being built, not whichever ``tapestry`` is installed: the CLI
    reference (mkdocs-click) imports it too."""
    _this_tree()
    return config


def _this_tree() -> None:
    if str(SERVICES) not in sys.path:
        sys.path.insert(0, str(SERVICES))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} lost its {MARKER} marker")
    return markdown.replace(MARKER, render())


def render() -> str:
    """The reference as Markdown: the consortium file, then the node file."""
    _this_tree()
    from tapestry.config import ConsortiumConfig, NodeConfig

    shown: dict[type[BaseModel], tuple[str, str]] = {}
    parts: list[str] = []
    for title, anchor, root in (
        ("The consortium file", "consortium", ConsortiumConfig),
        ("The node file", "node", NodeConfig),
    ):
        parts.append(f"### {title} {{#{anchor}-file}}\n")
        parts.extend(_sections(root, anchor, "", shown))
    return "\n".join(parts)


def _sections(
    model: type[BaseModel],
    anchor: str,
    table: str,
    shown: dict[type[BaseModel], tuple[str, str]],
    array: bool = False,
    said: str = "",
) -> list[str]:
    """The section of ``model``, then the sections of the tables it holds. Its keys live in
    TOML table ``table`` (an array of tables when ``array``; the file's top level when
    empty), which the field holding it describes as ``said``. A model shown before (the
    ``[model]`` and ``[tls]`` tables both files share) links to where it was shown."""
    title = f"[[{table}]]" if array else f"[{table}]"
    out: list[str] = [f"#### `{title}` {{#{anchor}}}\n", f"{said}\n"] if table else []
    if model in shown:
        first_title, first_anchor = shown[model]
        return [*out, f"As [`{first_title}`](#{first_anchor}) in the consortium file.\n"]
    shown[model] = (title, anchor)
    doc = _docstring(model)
    if doc:
        out.append(doc + "\n")
    rows, tables = [], []
    for name, field in model.model_fields.items():
        inner, inner_array = _section_model(field.annotation)
        if inner is None:
            rows.append(f"| `{name}` | {_type(field)} | {_default(field)} | {_describe(field)} |")
        else:
            key = f"{table}.{name}" if table else name
            tables.append((inner, f"{anchor}-{name}", key, inner_array, _describe(field)))
    if rows:
        out += ["| key | type and bounds | default | what it is |", "|---|---|---|---|", *rows, ""]
    for inner, inner_anchor, key, inner_array, inner_said in tables:
        out.extend(_sections(inner, inner_anchor, key, shown, inner_array, inner_said))
    return out


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds as a TOML table (and whether as an array of tables)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    from tapestry.config import TABLES  # a value read from a table ([model]: a ModelSpec)

    if annotation in TABLES:
        return TABLES[annotation], False
    return None, False


def _type(field: FieldInfo) -> str:
    words = _type_name(field.annotation)
    bounds = []
    for meta in field.metadata:
        for attribute, form in BOUNDS.items():
            value = getattr(meta, attribute, None)
            if value is not None:
                bounds.append(form.format(_number(value)))
        unit = "entries" if words.startswith("list") else "characters"
        low, high = getattr(meta, "min_length", None), getattr(meta, "max_length", None)
        if low is not None:
            bounds.append("not empty" if low == 1 else f"at least {low} {unit}")
        if high is not None:
            bounds.append(f"at most {high} {unit}")
        pattern = getattr(meta, "pattern", None)
        if pattern is not None:
            bounds.append(f"matches `{pattern}`")
    return words + (f", {', '.join(bounds)}" if bounds else "")


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f'`"{value}"`' for value in args)
    if origin in (Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" (optional)" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}s"
    if origin is dict:
        return "table"
    if annotation is Path:
        return "path"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    return f"`{value}`"


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{value:,}".replace(",", "_") if isinstance(value, int) else repr(value)


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__doc__
    if not doc or doc == inspect.getdoc(BaseModel):
        return ""
    return inspect.cleandoc(doc)


def _describe(field: FieldInfo) -> str:
    """The field's description: its docstring in ``tapestry.config`` (pydantic's
    ``use_attribute_docstrings``) or its ``Field(description=...)``."""
    return " ".join((field.description or "").split()).replace("|", "\\|") or "—"
