"""What the tree promises: short functions, and the light parts of the package light.

The import layering itself (no cycles; the core's rooms in layers) is import-linter's,
run by scripts/test from pyproject.toml's ``[tool.importlinter]``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "tapestry"
MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        if "consortium/v1" in path.as_posix():  # generated
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_settings_and_bounds_import_without_torch() -> None:
    """A config error is reported before torch loads: the configuration, the model spec,
    the policy and its strategy settings, and every bound are torch-free (and so is the
    core's public face until a name in it is used)."""
    probe = (
        "import sys\n"
        "import tapestry.config, tapestry.limits, tapestry.training.consortium\n"
        "from tapestry.training.consortium.models.spec import ModelSpec\n"
        "from tapestry.training.consortium.governance.policy import ContributionPolicy\n"
        "ContributionPolicy(0.5, 0.5, strategy='diloco'); ModelSpec('gpt', 256, 32)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_the_public_face_still_gives_the_proof_of_concepts_names() -> None:
    from tapestry.training import consortium
    from tapestry.training.consortium import types

    for name in consortium.__all__:
        assert getattr(consortium, name) is not None, name
    assert types.ModelState is consortium.ModelState
