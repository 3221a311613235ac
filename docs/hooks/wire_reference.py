"""MkDocs hook: the wire contract's reference, generated from the .proto files, so the page
says what ``protos/`` says and nothing else.

``docs/reference/wire.md`` holds the marker ``<!-- wire-reference -->``; this hook replaces it
with every service and its RPCs, every message and its fields, and every enum and its values,
each with the leading comment buf lint requires of it (``protos/buf.yaml``). It reads the
files as text: the contract's layout is regular (one declaration per line, comments above
what they describe), and a declaration this reader does not understand fails the build
rather than vanish from the page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "<!-- wire-reference -->"
PAGE = "reference/wire.md"
PROTOS = Path(__file__).resolve().parents[2] / "protos" / "tapestry" / "consortium" / "v1"
FILES = ("consortium.proto",)

_RPC = re.compile(
    r"rpc (\w+)\((stream )?([\w.]+)\) returns \((stream )?([\w.]+)\);$"  # one line each
)
_FIELD = re.compile(r"(repeated |optional )?(map<[\w.]+, ?[\w.]+>|[\w.]+) (\w+) = (\d+);$")
_VALUE = re.compile(r"(\w+) = (\d+);$")


@dataclass
class Member:
    """A field, an RPC or an enum value, with the comment above it."""

    name: str
    comment: str
    number: str = ""
    kind: str = ""  # a field's type; an RPC's request
    returns: str = ""  # an RPC's response
    oneof: str = ""  # the oneof a field belongs to


@dataclass
class Declaration:
    """A service, message or enum at the top of a file."""

    keyword: str
    name: str
    comment: str
    members: list[Member] = field(default_factory=list)


@dataclass
class ProtoFile:
    name: str
    comment: str
    declarations: list[Declaration] = field(default_factory=list)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} lost its {MARKER} marker")
    return markdown.replace(MARKER, render())


def parse(path: Path) -> ProtoFile:
    """The file's header comment and its top-level declarations with their members."""
    proto = ProtoFile(path.name, "")
    comment: list[str] = []
    current: Declaration | None = None
    oneof = ""
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("//"):
            text = line[2:].strip()
            if set(text) != {"-"}:  # a section rule, not a comment
                comment.append(text)
            continue
        said, comment = _paragraphs(comment), []
        if not line or line.startswith(("reserved ", "import ", "package ")):
            continue
        if line.startswith("syntax "):
            proto.comment = said
        elif current is None:
            match = re.fullmatch(r"(service|message|enum) (\w+) \{(\})?", line)
            if not match:
                raise ValueError(f"{path.name}:{number}: cannot read {line!r}")
            current = Declaration(match[1], match[2], said)
            proto.declarations.append(current)
            if match[3]:
                current = None
        elif line == "}":
            if oneof:
                oneof = ""
            else:
                current = None
        elif match := re.fullmatch(r"oneof (\w+) \{", line):
            oneof = match[1]
        elif current.keyword == "service" and (match := _RPC.fullmatch(line)):
            request = ("stream of " if match[2] else "") + match[3]
            response = ("stream of " if match[4] else "") + match[5]
            current.members.append(Member(match[1], said, kind=request, returns=response))
        elif current.keyword == "message" and (match := _FIELD.fullmatch(line)):
            kind = (match[1] or "").strip() + " " + match[2]
            current.members.append(Member(match[3], said, match[4], kind.strip(), oneof=oneof))
        elif current.keyword == "enum" and (match := _VALUE.fullmatch(line)):
            current.members.append(Member(match[1], said, match[2]))
        else:
            raise ValueError(f"{path.name}:{number}: cannot read {line!r}")
    return proto


def render() -> str:
    files = [parse(PROTOS / name) for name in FILES]
    known = {d.name for f in files for d in f.declarations}
    out: list[str] = []
    for proto in files:
        out += [f"## `{proto.name}` {{#{proto.name.replace('.', '-')}}}", ""]
        out += [_text(proto.comment), ""]
        for keyword, title in (("service", "Services"), ("message", "Messages"), ("enum", "Enums")):
            declarations = [d for d in proto.declarations if d.keyword == keyword]
            if declarations:
                out += [f"### {title} in `{proto.name}`", ""]
            for declaration in declarations:
                out += [f"#### `{declaration.name}` {{#{declaration.name}}}", ""]
                out += [_text(declaration.comment), ""]
                out += _table(declaration, known)
    return "\n".join(out)


def _table(declaration: Declaration, known: set[str]) -> list[str]:
    if not declaration.members:
        return ["No fields.", ""]
    if declaration.keyword == "service":
        rows = ["| RPC | request | response | what it does |", "|---|---|---|---|"]
        rows += [
            f"| `{m.name}` | {_type(m.kind, known)} | {_type(m.returns, known)} | "
            f"{_cell(m.comment)} |"
            for m in declaration.members
        ]
    elif declaration.keyword == "message":
        rows = ["| field | number | type | what it is |", "|---|---|---|---|"]
        rows += [
            f"| `{m.name}`{f' (one of `{m.oneof}`)' if m.oneof else ''} | {m.number} | "
            f"{_type(m.kind, known)} | {_cell(m.comment)} |"
            for m in declaration.members
        ]
    else:
        rows = ["| value | number | what it is |", "|---|---|---|"]
        rows += [f"| `{m.name}` | {m.number} | {_cell(m.comment)} |" for m in declaration.members]
    return [*rows, ""]


def _type(kind: str, known: set[str]) -> str:
    """A type, linked to its section when the contract declares it."""
    words = kind.split(" ")
    name = words[-1]
    shown = f"[`{name}`](#{name})" if name in known else f"`{name}`"
    return " ".join([*words[:-1], shown])


def _paragraphs(lines: list[str]) -> str:
    """Comment lines as paragraphs: an empty ``//`` line ends one."""
    text = "\n".join(lines)
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip())


def _text(text: str) -> str:
    """A comment as Markdown text: its ``<`` and ``*`` are the contract's, not markup."""
    return text.replace("<", "&lt;").replace("*", "\\*")


def _cell(text: str) -> str:
    """A comment in one table cell."""
    return _text(" ".join(text.split())).replace("|", "\\|")
