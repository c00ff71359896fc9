"""Where benchmark scripts leave their numbers: one JSON file each, next to the printed table."""
from __future__ import annotations

import json
import os
from typing import Any


def write_results(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")
