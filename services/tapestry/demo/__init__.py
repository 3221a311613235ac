"""The local demo: Vietnam, Switzerland and India, as in the proof of concept."""

from __future__ import annotations

from pathlib import Path

from tapestry.demo.launcher import LocalNodeSpec

CORPORA = Path(__file__).parent / "corpora"

# Quality scores, floor and cap as in the proof of concept.
DEMO_POLICY = {"quality_floor": 0.75, "max_node_weight": 0.5, "weighting": "quality"}
DEMO_NODES = [
    LocalNodeSpec("vietnam", "Vietnam", 0.90, [CORPORA / "vietnam.txt"]),
    LocalNodeSpec("switzerland", "Switzerland", 0.86, [CORPORA / "switzerland.txt"]),
    LocalNodeSpec("india", "India", 0.88, [CORPORA / "india.txt"]),
]
