"""tests/mutations.py stays runnable: a mutation whose snippet no longer occurs exactly once is skipped by it as
"update the mutation", which nobody sees until the list is run (13 had gone stale across refactors)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mutations import MUTATIONS  # noqa: E402


def test_every_mutation_names_a_snippet_that_occurs_once_and_tests_that_exist():
    problems = []
    for m in MUTATIONS:
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name!r}: snippet found {count} times in {m.file}")
        for test in m.tests:
            path, _, name = test.partition("::")
            if not (ROOT / path).is_file():
                problems.append(f"{m.name!r}: no test file {path}")
            elif name and not re.search(rf"^def {re.escape(name.split('[')[0])}\(", (ROOT / path).read_text(), re.M):
                problems.append(f"{m.name!r}: no test {test}")
    assert not problems, "\n".join(problems)
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS), "two mutations share a name"
