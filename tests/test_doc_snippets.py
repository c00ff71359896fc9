"""The Python in README.md and docs/cache-format.md runs as written, on tiny data: only paths, the batch size, the
epoch count and the example's shard and teacher id are swapped for the test's. docs/library.md's loop runs in
tests/test_library.py; the shell commands in the docs are not run here."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_readme_library_snippet_is_complete_and_trains(tiny_data, cache, monkeypatch):
    (code,) = python_blocks(README)
    swaps = {'"shards/train-{000000..000009}.tar"': repr(tiny_data["train"].pattern), '"cache.zarr"': repr(cache),
             "batch_size=128)": "batch_size=8, workers=0)", "range(10)": "range(2)"}
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)  # a fresh namespace: every name the snippet uses it defines
    assert namespace["epoch"] == 1 and namespace["loss"].item() > 0


def test_the_cache_format_snippets_run_in_order_against_a_real_cache(cache, monkeypatch):
    """docs/cache-format.md's blocks build on each other (root, meta, then reads): run them in order, swapping only
    the example's shard number and teacher id for the test cache's."""
    doc = README.parent / "docs" / "cache-format.md"
    code = "\n".join(python_blocks(doc))
    old = 's, i, tid = meta["rows_per_shard"], 3, "cifar_resnet56"'
    assert old in code
    code = code.replace(old, 's, i, tid = meta["rows_per_shard"], 2, "r14"')
    monkeypatch.chdir(Path(cache).parent)  # the snippets open "cache.zarr"
    if Path(cache).name != "cache.zarr":
        code = code.replace('"cache.zarr"', repr(cache))
    namespace = {}
    exec(compile(code, str(doc), "exec"), namespace)
    assert namespace["p"].shape[-1] == namespace["idx"].shape[-1] and namespace["done"]
    assert (namespace["p"] <= 1).all()
