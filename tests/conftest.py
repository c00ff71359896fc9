"""Tiny generated datasets and teachers: tests never need ../shared or a network."""
import json
import os
import shutil
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

# One torch thread per test process, and (through the environment) per `pld`, torchrun or pytest subprocess a
# test starts: these tiny models gain nothing from a second thread, and processes each spinning two OpenMP
# threads on 2 shared cores (xdist workers, subprocesses) made a cifar_resnet14 forward 30x slower (0.03 s vs
# 0.8-1.2 s). Tests assert results, never speed. A value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after OMP_NUM_THREADS: torch reads it once, at import)

THREADS = int(os.environ["OMP_NUM_THREADS"])
torch.set_num_threads(THREADS)

from pld_pipeline.cache import schema
from pld_pipeline.models import load_model
from pld_pipeline.shards import Split, split_arrays

sys.path.insert(0, os.path.dirname(__file__))  # so `fake_models:factory` resolves in-process

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count (test_ray matches a Ray task's) must not leave it to the next."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


def free_port() -> int:
    """A TCP port nothing listens on now, for the servers the tests start (S3, HTTP, Ray, torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored_object(url: str, path: str, shard: int, view: int = 0) -> str:
    """The file that holds a data shard's rows (and ``view``) of the array at ``path`` in a local cache."""
    return os.path.join(url, schema.object_key(path, shard, view))


def swap_objects(url: str, path: str, a: int, b: int) -> None:
    """Swap the stored objects of data shards ``a`` and ``b`` of the array at ``path`` (a copy gone wrong)."""
    fa, fb = stored_object(url, path, a), stored_object(url, path, b)
    da, db = open(fa, "rb").read(), open(fb, "rb").read()
    assert da != db
    open(fa, "wb").write(db)
    open(fb, "wb").write(da)


def swap_views_in_object(url: str, path: str, shard: int, a: int, b: int) -> None:
    """Swap two views' chunks inside one stored object by editing its shard index (zarr's sharding codec: one
    (offset, nbytes) uint64 pair per inner chunk, then a crc32c of the index), keeping every checksum zarr
    checks valid: the damage only the units' sha256 can see."""
    import google_crc32c
    f = stored_object(url, path, shard, a)
    data = bytearray(open(f, "rb").read())
    n = schema.VIEWS_PER_OBJECT
    index = np.frombuffer(bytes(data[-(16 * n + 4):-4]), "<u8").reshape(n, 2).copy()
    assert (index[a % n] != index[b % n]).any()
    index[[a % n, b % n]] = index[[b % n, a % n]]
    raw = index.tobytes()
    data[-(16 * n + 4):] = raw + google_crc32c.value(raw).to_bytes(4, "little")
    open(f, "wb").write(bytes(data))


def make_images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent blobs so a small model can learn them in a few steps, with noise so views differ."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        cy, cx = (c // 4) * size / 3 + 2, (c % 4) * size / 4 + 2
        blob = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        noise = rng.normal(0, 20, (size, size, 3))
        images[i] = np.clip(blob[..., None] * np.array([1.0, 0.6 + 0.04 * c, 0.3]) + noise + 20, 0, 255)
    return images, labels


def big_shard(path: Path) -> Path:
    """A 6-sample shard over 2 MiB (a 600 kB `.bin` beside each image), so a same-size edit in its middle is out
    of the quick hash's reach (size, first and last MiB): only the per-sample digests can see it."""
    import io
    import tarfile

    from pld_pipeline.shards import encode_png
    images, labels = make_images(6, seed=3)
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            for ext, data in (("png", encode_png(images[i])), ("cls", str(int(labels[i])).encode()),
                              ("bin", rng.bytes(600_000))):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def build_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``build(folder)`` filled, built once per test run. Under pytest-xdist each worker is a session
    of its own: the first worker to ask builds under a file lock and the others wait and reuse its files (the
    recipe in pytest-xdist's docs), so two workers never pay for the same teacher and all see the same paths."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed half-way left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train: 3 shards (16, 16, 8 samples); val: 1 shard (12 samples); 16x16 PNG, 10 classes."""
    def build(root):
        images, labels = make_images(52)
        splits = split_arrays(images, labels, [f"class{i}" for i in range(NUM_CLASSES)], str(root),
                              val_fraction=12 / 52, shard_size=16, seed=0)
        (root / "splits.json").write_text(json.dumps({k: asdict(v) for k, v in splits.items()}))
    root = build_once(tmp_path_factory, "data", build)
    return {k: Split(**v) for k, v in json.loads((root / "splits.json").read_text()).items()}


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A random (seeded) cifar_resnet8 saved as safetensors, wrapped the way real checkpoints are."""
    def build(folder):
        from safetensors.torch import save_file
        torch.manual_seed(123)
        model = load_model("cifar_resnet8", num_classes=NUM_CLASSES)
        save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "teacher.safetensors"))
    return str(build_once(tmp_path_factory, "teacher", build) / "teacher.safetensors")


@pytest.fixture(scope="session")
def teacher_run(tiny_data, tmp_path_factory):
    """A teacher trained with --loss ce (how users train one), saved as a checkpoint."""
    def build(out):
        from pld_pipeline.distill import DistillConfig, distill
        distill(DistillConfig(data=tiny_data["train"].pattern, out=str(out), student="cifar_resnet14", loss="ce",
                              val_data=tiny_data["val"].pattern, epochs=3, batch_size=8, lr=3e-3, workers=0,
                              device="cpu", num_classes=NUM_CLASSES, recipe={"name": "cifar", "size": 16, "pad": 2}))
    return str(build_once(tmp_path_factory, "teacher_run", build) / "best.safetensors")


@pytest.fixture(scope="session")
def cache(tiny_data, teacher_run, tmp_path_factory):
    """teacher_run's cifar_resnet14 as teacher 'r14' over tiny_data's train split: 4 views, top-5, temperatures
    1 and 2. Shared by every test of the run: tests that damage or extend a cache work on a copy."""
    def build(folder):
        from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
        cache_teacher(CacheTeacherConfig(
            data=tiny_data["train"].pattern, out=str(folder / "c.zarr"),
            teachers=[TeacherSpec("cifar_resnet14", teacher_run, "r14")], views=4, size=16, k=5,
            temperatures=(1.0, 2.0), batch_size=16, workers=0, device="cpu", recipe_overrides={"pad": 2}))
    return str(build_once(tmp_path_factory, "cache", build) / "c.zarr")


# -- pytest-xdist (pyproject's addopts: -n auto --dist loadgroup) ----------------------------------------------
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU (at most 8: past that the slowest test bounds the run) for the whole suite.
    A run naming test files or tests stays in this process (0): two workers' start-up and session fixtures cost
    more than a selection gains, and helper runs (tests/mutations.py, benchmarks/gpu_check.py) stay light.
    PYTEST_XDIST_AUTO_NUM_WORKERS, or an explicit -n N, decides instead."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    if config.args_source == pytest.Config.ArgsSource.ARGS and not any(
            os.path.isdir(arg.split("::")[0]) for arg in config.args):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 8) if cpus > 1 else 0


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist: a test using a module-scoped fixture (a server, a reference cache) joins its module's
    xdist_group, so `--dist loadgroup` builds that fixture on one worker, once; and slow tests are handed out
    first, so no long test starts last while the other worker sits idle. A plain run keeps file order."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        scopes = {d[-1].scope for d in defs.name2fixturedefs.values() if d} if defs else set()
        if scopes & {"module", "package", "class"} and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
