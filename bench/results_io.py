"""What every bench script ends with: the result as indented JSON on stdout and, with --out, in that file.

Bench scripts run as files (`python bench/NAME.py`), so this folder is on their import path."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result, out: str | None) -> int:
    """Print `result` as JSON (values JSON cannot hold as text) and write it to `out` when given; returns 0, the
    script's exit status."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0
