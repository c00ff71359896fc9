"""Opening a cache reads its shards' markers, unit indexes and samples units in a few round trips, not ~9 per shard
one after another (issue 32): counted with a wrapped store, never timed. The batched reads check every unit
exactly as a read of one does, and report the first damaged unit in the order a loop would have."""
import asyncio
import contextvars
import shutil

import numpy as np
import pytest
import zarr

from pld_pipeline.cache import Cache, verify_cache
from pld_pipeline.cache.format import CacheError
from pld_pipeline.cache.integrity import DamagedUnit
from pld_pipeline.student_data import StudentData
from conftest import swap_objects


#: How many store reads came before this one, one after another (in this task and the tasks it was started from)
DEPTH = contextvars.ContextVar("depth", default=0)


class Requests:
    """Store gets, and ``rounds``: the longest chain of gets each of which was issued after the one before it had
    returned (a loop of blocking reads: one per get; a gather: one per batch), counted through zarr's ``sync``
    calls in order. Causal, so it does not depend on how fast anything ran."""

    def __init__(self):
        self.gets, self.rounds, self.keys = 0, 0, []

    def reset(self):
        self.gets, self.rounds, self.keys = 0, 0, []


@pytest.fixture
def requests(monkeypatch):
    counted = Requests()
    original_get = zarr.storage.LocalStore.get  # LocalObjects (a local cache) reads each object through it once
    original_submit = asyncio.run_coroutine_threadsafe  # how zarr's sync() hands a coroutine to its event loop

    async def get(store, key, *args, **kwargs):
        depth = DEPTH.get() + 1
        DEPTH.set(depth)  # the caller's context: its next get comes after this one
        counted.gets, counted.rounds = counted.gets + 1, max(counted.rounds, depth)
        counted.keys.append(key)
        return await original_get(store, key, *args, **kwargs)

    def submit(coro, loop):
        async def after_the_calls_before():  # sync() blocks: everything read so far came before this call
            DEPTH.set(counted.rounds)
            return await coro
        return original_submit(after_the_calls_before(), loop)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", submit)
    return counted


def open_student(data, cache, requests, **kw):
    requests.reset()
    StudentData(data, cache=cache, batch_size=1, workers=0, **kw)
    return requests.rounds, requests.gets


def test_opening_a_student_takes_as_many_round_trips_for_three_shards_as_for_one(tiny_data, cache, requests):
    one_shard = open_student(tiny_data["train"].shards[0], cache, requests)
    three_shards = open_student(tiny_data["train"].pattern, cache, requests)
    assert three_shards[1] >= one_shard[1] + 2 * 5  # two more markers and samples units (5 objects each) ...
    assert three_shards[0] == one_shard[0]  # ... in the same round trips: one by one it was 18 more


def test_a_student_under_a_class_map_reads_each_samples_unit_once_at_start_up(tiny_data, cache, requests):
    open_student(tiny_data["train"].pattern, cache, requests, class_map=[[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]])
    markers = [k for k in requests.keys if k.endswith(".samples/zarr.json")]
    assert sorted(markers) == sorted(set(markers)) and len(markers) == 3


def test_verify_takes_as_many_round_trips_for_three_shards_as_for_two(cache, tmp_path, requests):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    for unit in Cache(url).units(shard=2):  # two complete shards, the third's units not written
        shutil.rmtree(f"{url}/units/{unit.name}")
    rounds = {}
    for where in (cache, url):
        requests.reset()
        report = verify_cache(where)
        rounds[where] = (requests.rounds, report.units_checked)
    assert rounds[cache][1] == 9 and rounds[url][1] == 6
    assert rounds[cache][0] == rounds[url][0]  # one after another it was ~9 more per unit


def test_reading_units_together_gives_what_reading_each_alone_gives_and_names_each_damaged_one(cache, tmp_path):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    swap_objects(url, "samples/key", 0, 2)  # a copy gone wrong: shards 0 and 2 hold each other's keys
    reader = Cache(url)
    units = reader.units()
    together = reader.read_units(units)
    for unit, got in zip(units, together):
        if unit.name in ("s000000.samples", "s000002.samples"):
            assert isinstance(got, DamagedUnit) and got.unit == unit.name and "samples/key differs" in str(got)
            with pytest.raises(DamagedUnit, match=unit.name):
                reader.read_unit(unit)
        else:
            alone = reader.read_unit(unit)
            assert got.keys() == alone.keys()
            assert all(got[p].dtype == alone[p].dtype and got[p].tobytes() == alone[p].tobytes() for p in got)
    with pytest.raises(DamagedUnit, match="s000000.samples"):  # the first damaged shard, as a loop would name
        reader.samples_of([1, 0, 2])
    with pytest.raises(DamagedUnit, match="s000002.samples"):
        reader.samples_of([1, 2, 0])
    assert reader.samples_of([1])[1].keys() == reader.samples(1).keys()


def test_a_missing_samples_unit_after_a_damaged_one_is_reported_in_shard_order(cache, tmp_path):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    swap_objects(url, "samples/label", 0, 1)
    shutil.rmtree(f"{url}/units/s000002.samples")
    reader = Cache(url)
    with pytest.raises(DamagedUnit, match="s000000.samples"):
        reader.samples_of([0, 1, 2])
    with pytest.raises(CacheError, match="has no samples unit"):
        reader.samples_of([2, 0, 1])
