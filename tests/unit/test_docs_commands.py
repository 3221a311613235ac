"""Every command the README and the docs site show works as written from a fresh clone: each
`tapestry ...` line names a real command path with real options (its `--help` runs), each
script named exists and is executable, and the generated references cover the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tapestry.cli import main

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "docs" / "hooks"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _bash_lines() -> list[tuple[str, str]]:
    """(where, line) for every line of every ```bash block, continuations joined."""
    lines = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", _text(page), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip():
                    lines.append((page.relative_to(ROOT).as_posix(), line))
    return lines


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _tapestry_calls(tokens: list[str]) -> list[list[str]]:
    """The arguments of each `tapestry` (or `.venv/bin/tapestry`, `-m tapestry`) call; a
    `./scripts/demo` call is `tapestry demo` with its arguments."""
    calls, segment = [], []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        for i, word in enumerate(segment):
            if word == "tapestry" or word.endswith("/bin/tapestry"):
                calls.append(segment[i + 1 :])
                break
            if word.endswith("scripts/demo"):
                calls.append(["demo", *segment[i + 1 :]])
                break
        segment = []
    return calls


BASH_CALLS = [
    (f"{where}: {line.strip()}", args)
    for where, line in _bash_lines()
    for args in _tapestry_calls(_tokens(line))
]
# Commands quoted in prose, e.g. `tapestry base export --out base.safetensors`.
INLINE_CALLS = [
    (f"{page.relative_to(ROOT).as_posix()}: `{span}`", call)
    for page in PAGES
    for span in re.findall(
        r"`((?:\.venv/bin/tapestry|tapestry|\./scripts/demo) [^`\n]+)`", _text(page)
    )
    for call in _tapestry_calls(_tokens(span))
]
PLACEHOLDER = re.compile(r"\.\.\.|[A-Z][A-Z_]*")


def _option(command: click.Command, name: str) -> click.Parameter | None:
    for param in command.params:
        if name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _resolve(args: list[str]) -> tuple[list[str], list[str]]:
    """The command path ``args`` names and any problem with it: a command or an option
    that does not exist, or a positional argument the command does not take."""
    command: click.Command = main
    path: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        where = " ".join(["tapestry", *path])
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            param = _option(command, name)
            if name != "--help" and param is None:
                problems.append(f"{where} has no option {name}")
            elif isinstance(param, click.Option) and not param.is_flag and "=" not in word:
                i += 1  # its value
        elif PLACEHOLDER.fullmatch(word):
            break  # `tapestry COMMAND --help`, `tapestry --log-format json ...`
        elif isinstance(command, click.Group):
            sub = command.get_command(click.Context(command), word)
            if sub is None:
                problems.append(f"{where} has no command {word!r}")
                break
            command, path = sub, [*path, word]
        elif not any(isinstance(p, click.Argument) for p in command.params):
            problems.append(f"{where} takes no argument {word!r}")
        i += 1
    return path, problems


def test_the_docs_show_tapestry_commands() -> None:
    assert len(BASH_CALLS) >= 20 and len(INLINE_CALLS) >= 20


@pytest.mark.parametrize(("where", "args"), BASH_CALLS + INLINE_CALLS, ids=lambda x: str(x))
def test_a_tapestry_command_in_the_docs_exists_as_written(where: str, args: list[str]) -> None:
    path, problems = _resolve(args)
    assert not problems, where

    result = CliRunner().invoke(main, [*path, "--help"])

    assert result.exit_code == 0, (where, result.output)


def test_a_misspelt_command_or_option_is_caught() -> None:
    assert _resolve(["round", "run", "--round", "3"])[1][0] == (
        "tapestry round run has no option --round"
    )
    assert _resolve(["rounds", "list"])[1] == ["tapestry rounds takes no argument 'list'"]
    assert _resolve(["bases", "export"])[1] == ["tapestry has no command 'bases'"]
    assert _resolve(["base", "export", "--force"]) == (["base", "export"], [])
    assert _resolve(["--log-format", "json", "node", "serve"]) == (["node", "serve"], [])


SCRIPTS = sorted(
    {
        (page.relative_to(ROOT).as_posix(), name)
        for page in PAGES
        for name in re.findall(r"(?<![\w/.-])(?:\./)?scripts/([\w-]+)", _text(page))
    }
)
BENCHMARKS = sorted(
    {
        (page.relative_to(ROOT).as_posix(), name)
        for page in PAGES
        for name in re.findall(r"(?<![\w/.-])benchmarks/([\w-]+\.py)", _text(page))
    }
)


@pytest.mark.parametrize(("page", "name"), SCRIPTS)
def test_a_script_the_docs_name_exists_and_is_executable(page: str, name: str) -> None:
    script = ROOT / "scripts" / name
    assert script.is_file() and script.stat().st_mode & 0o111, f"{page}: scripts/{name}"


@pytest.mark.parametrize(("page", "name"), BENCHMARKS)
def test_a_benchmark_the_docs_name_exists(page: str, name: str) -> None:
    assert (ROOT / "benchmarks" / name).is_file(), f"{page}: benchmarks/{name}"


def test_the_readme_is_a_front_page() -> None:
    assert len(_text(ROOT / "README.md").splitlines()) <= 250


def _hook(name: str) -> str:
    """Render a hook's reference in a fresh interpreter; fail if it imported torch."""
    code = (
        f"import sys; sys.path.insert(0, {str(HOOKS)!r}); import {name}; "
        f"text = {name}.render(); assert 'torch' not in sys.modules, 'imported torch'; "
        "sys.stdout.write(text)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_configuration_reference_shows_every_setting_with_its_description() -> None:
    from pydantic import BaseModel

    from tapestry import config

    text = _hook("config_reference")

    models = [
        m
        for m in vars(config).values()
        if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == config.__name__
    ]
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            said = " ".join(field.description.split()).replace("|", "\\|")
            assert said in text, f"{model.__name__}.{name} is not in the reference"
    assert "[[nodes]]" in text and "[policy.diloco]" in text and "[limits]" in text


def test_the_wire_reference_shows_every_declaration_of_the_contract() -> None:
    text = _hook("wire_reference")

    protos = ROOT / "protos" / "tapestry" / "consortium" / "v1"
    for proto in sorted(protos.glob("*.proto")):
        source = proto.read_text(encoding="utf-8")
        for name in re.findall(r"^(?:service|message|enum) (\w+)", source, re.M):
            assert f"#### `{name}`" in text, f"{proto.name}: {name}"
        for rpc in re.findall(r"^\s*rpc (\w+)\(", source, re.M):
            assert f"| `{rpc}` |" in text, f"{proto.name}: rpc {rpc}"


def test_the_readme_links_resolve() -> None:
    """The front page's links (read on a forge, outside the site) name files and headings
    that exist."""
    from markdown.extensions.toc import slugify

    for target in re.findall(r"\]\(([^)#:]+)(?:#([^)]+))?\)", _text(ROOT / "README.md")):
        path, anchor = ROOT / target[0], target[1]
        assert path.exists(), target[0]
        if anchor:
            headings = re.findall(r"^#+ (.+?)(?: \{#([\w-]+)\})?$", _text(path), re.M)
            ids = {explicit or slugify(title, "-") for title, explicit in headings}
            assert anchor in ids, f"{target[0]}#{anchor}"
