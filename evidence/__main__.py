"""``python -m evidence OUT_DIR [--smoke]`` (what ``scripts/evidence`` runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evidence.run import run_evidence
from evidence.settings import EVIDENCE, SMOKE
from tapestry.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/evidence",
        description="Run the local consortium with gpt and evaluate every model on every "
        "jurisdiction's held-out split; writes OUT_DIR/evidence.json, report.png, report.html.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the tiny CI size (2 rounds)")
    args = parser.parse_args(argv)
    try:
        run_evidence(SMOKE if args.smoke else EVIDENCE, args.out_dir)
    except UserError as error:
        print(f"scripts/evidence: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
