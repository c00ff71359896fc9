"""What a class map is, without torch: one entry per student class, the teacher class(es) it covers, parsed and
checked from its JSON form. The command line checks a --class-map with this before it imports torch; applying a
map to teacher targets is class_map.py's (which exports these names too).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Sequence

from .errors import MetadataError, PldError
from .files import read_bytes

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: A map file larger than this is refused before it is read (a 21k-class map by name is ~0.5 MB).
MAX_MAP_BYTES = 64 << 20


class ClassMapError(PldError):
    """A class map that cannot be used as written (one line naming the file and the entry)."""


@dataclass(frozen=True)
class ClassMap:
    """``groups[j]``: the teacher classes student class ``j`` covers (disjoint, non-empty, each in [0, C_t))."""
    groups: tuple[tuple[int, ...], ...]
    num_teacher_classes: int

    def __post_init__(self) -> None:  # a map built in code gets the checks a file gets (parse_class_map names entries)
        flat = [c for g in self.groups for c in g]
        if (not self.groups or not all(self.groups) or len(set(flat)) != len(flat)
                or not all(isinstance(c, int) and 0 <= c < self.num_teacher_classes for c in flat)):
            raise ClassMapError("a ClassMap needs non-empty, disjoint groups of teacher classes in "
                                f"[0, {self.num_teacher_classes}); build it with parse_class_map for a precise error.")

    @property
    def num_classes(self) -> int:
        """Student classes."""
        return len(self.groups)

    @cached_property
    def _student_of(self) -> Tensor:
        import torch  # here, not at the top: the command line parses maps before it imports torch
        out = torch.full((self.num_teacher_classes,), self.num_classes, dtype=torch.int64)
        for j, group in enumerate(self.groups):
            out[list(group)] = j
        return out

    def student_of(self, device: torch.device | str = "cpu") -> Tensor:
        """int64 [C_t]: each teacher class's student class, ``num_classes`` for an unmapped one (built once)."""
        return self._student_of.to(device)

    def to_dict(self) -> dict[str, Any]:
        """What a run records (config.json, summary): the resolved groups and their digest."""
        groups = [list(g) for g in self.groups]
        text = json.dumps({"groups": groups, "num_teacher_classes": self.num_teacher_classes}, separators=(",", ":"))
        return {"groups": groups, "num_teacher_classes": self.num_teacher_classes,
                "sha256": hashlib.sha256(text.encode()).hexdigest()}


def parse_class_map(doc: Any, num_teacher_classes: int, teacher_names: Sequence[str] | None = None,
                    where: str = "class map") -> ClassMap:
    """A map from its JSON value: ``[0, 1, 8, 9]``, ``[[0], [1, 9], [8]]`` or ``["airplane", ...]`` (names are
    looked up in ``teacher_names``). Refuses, naming ``where`` and the entry: an unknown class, an empty entry,
    a teacher class claimed twice (two student classes cannot share one: its mass would count twice)."""
    if not isinstance(doc, list) or not doc:
        raise ClassMapError(f"{where}: expected a non-empty JSON list with one entry per student class, e.g. "
                            "[0, 1, 8, 9], [[0], [1, 9], [8]] or [\"airplane\", \"ship\"].")
    index = {name: i for i, name in enumerate(teacher_names)} if teacher_names else None
    repeated = _repeated(teacher_names or [])
    owner: dict[int, int] = {}
    groups = []
    for j, entry in enumerate(doc):
        members = entry if isinstance(entry, list) else [entry]
        if not members:
            raise ClassMapError(f"{where}: entry {j} is empty; each student class covers at least one teacher class.")
        group = []
        for m in members:
            if isinstance(m, str):
                if index is None:
                    raise ClassMapError(f"{where}: entry {j} names class {m!r}, but the teacher's class names are "
                                        "not known (the cache records none for its classes); use class indices.")
                if m not in index:
                    raise ClassMapError(f"{where}: entry {j} names class {m!r}, which the teacher lacks (its "
                                        f"{num_teacher_classes} classes do not include it).")
                if m in repeated:  # the last index would win silently: the student would learn another class
                    raise ClassMapError(f"{where}: entry {j} names class {m!r}, which the teacher's class names hold "
                                        f"{repeated[m]} times; use its class index instead.")
                c = index[m]
            elif isinstance(m, int) and not isinstance(m, bool):
                if not 0 <= m < num_teacher_classes:
                    raise ClassMapError(f"{where}: entry {j} names class {m}, which the teacher lacks (it has "
                                        f"classes 0..{num_teacher_classes - 1}).")
                c = m
            else:
                raise ClassMapError(f"{where}: entry {j} holds {json.dumps(m)[:40]}; entries are a teacher class "
                                    "index, a class name, or a list of them.")
            if c in owner:
                raise ClassMapError(f"{where}: teacher class {c} is claimed by student classes {owner[c]} and {j}; "
                                    "each teacher class may belong to one student class only (merge them, or "
                                    "drop it from one).")
            owner[c] = j
            group.append(c)
        groups.append(tuple(group))
    return ClassMap(tuple(groups), num_teacher_classes)


def _repeated(names: Sequence[str]) -> dict[str, int]:
    """Names that occur more than once, with their counts."""
    from collections import Counter
    return {n: c for n, c in Counter(names).items() if c > 1}


def load_class_map(path: str, num_teacher_classes: int, teacher_names: Sequence[str] | None = None) -> ClassMap:
    """A map from a JSON file (``--class-map FILE``); size checked before reading, errors name the file."""
    try:
        doc = json.loads(read_bytes(path, MAX_MAP_BYTES, "a class map is a small JSON file"))  # not /dev/zero, a FIFO
    except FileNotFoundError:
        raise ClassMapError(f"--class-map {path}: no such file.") from None
    except MetadataError as e:
        raise ClassMapError(f"--class-map {e}") from None
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer past Python's 4300 digits
        why = getattr(e, "msg", None) or " ".join(str(e).split())[:120]
        raise ClassMapError(f"{path}: not valid JSON ({why}); a class map is a JSON list.") from None
    return parse_class_map(doc, num_teacher_classes, teacher_names, where=path)


def map_by_names(student_names: Sequence[str], teacher_names: Sequence[str]) -> list[int]:
    """The map (teacher index per student class) of a student whose class names all appear among the teacher's:
    e.g. a classes.json of ten ImageNet synsets under a 1k or 22k teacher. Refuses a name the teacher lacks."""
    index = {name: i for i, name in enumerate(teacher_names)}
    missing = [n for n in student_names if n not in index]
    if missing:
        raise ClassMapError(f"{len(missing)} student class name(s) are not teacher classes, e.g. {missing[0]!r}.")
    repeated = [n for n in student_names if n in _repeated(teacher_names)]
    if repeated:
        raise ClassMapError(f"student class {repeated[0]!r} names several teacher classes (its name repeats among "
                            "the teacher's); map it by index instead.")
    return [index[n] for n in student_names]
