"""Sweep, run and data folders from strangers, and every failure a user can fix, end in one line.

Each hostile file is built here: a symlink planted where pld writes, names that would break out of a Markdown
table or a CSV cell, a user's own files in a run folder, a CIFAR pickle that runs code, a non-finite loss, and
the failures that come from outside pld (full or read-only disk, network, malformed files).
"""
import csv
import errno
import functools
import http.server
import io
import itertools
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import free_port
from pld_pipeline import errors, files
from pld_pipeline.cache.integrity import DamagedUnit
from pld_pipeline.data import worker_errors
from pld_pipeline_cli.app import app

runner = CliRunner()
_REAL_FDOPEN = os.fdopen


def run(*args, env=None):
    """The CLI in-process; returns (exit code, output as one string)."""
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


def sweep_folder(root, names: dict, summaries: dict | None = None):
    """A sweep folder as `pld sweep` leaves it (sweep.json, one run folder per name), without training."""
    root.mkdir(exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"base": {}, "grid": {}, "runs": [], "names": names}))
    for i, name in enumerate(names):
        (root / name).mkdir()
        summary = (summaries or {}).get(name, {"best_val_top1": 50.0 + i, "last_val_top1": 40.0 + i,
                                               "train_seconds": 1.5})
        (root / name / "summary.json").write_text(json.dumps(summary))
    return root


# -- writes stay where the user pointed ----------------------------------------------------------------------------
@pytest.mark.parametrize("planted", ["results.md", "results.csv", "results.png"])
def test_report_refuses_a_symlink_planted_in_the_sweep_folder(tmp_path, planted):
    sweep = sweep_folder(tmp_path / "sw", {"lr=0.1": {"lr": 0.1}})
    victim = tmp_path / "bashrc"
    victim.write_text("echo mine\n")
    (sweep / planted).symlink_to(victim)
    code, output = run("report", sweep)
    assert code == 2 and "symbolic link" in one_error_line(output) and planted in output
    assert victim.read_text() == "echo mine\n" and (sweep / planted).is_symlink()
    assert not any(p.name.startswith("results") and not p.is_symlink() for p in sweep.iterdir())  # nothing written


def test_print_commands_refuses_a_symlinked_sweep_json(tmp_path):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    (sweep / "sweep.json").symlink_to(victim)
    code, output = run("sweep", "--print-commands", "--out", sweep, "--set", "data=x.tar", "--set",
                       "student=cifar_resnet8", "--grid", "lr=0.1,0.2")
    assert code == 2 and "sweep.json is a symbolic link" in one_error_line(output)
    assert victim.read_text() == "mine"


def test_a_run_folder_planted_as_a_symlink_is_refused(tmp_path):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (sweep / "lr=0.1").symlink_to(tmp_path / "elsewhere")
    code, output = run("sweep", "--print-commands", "--out", sweep, "--set", "data=x.tar", "--set",
                       "student=cifar_resnet8", "--grid", "lr=0.1")
    assert code == 2 and "lr=0.1 is a symbolic link" in one_error_line(output)
    assert not os.listdir(tmp_path / "elsewhere")


def test_the_demo_plot_refuses_a_symlink_planted_in_its_folder(tmp_path):
    from pld_pipeline.demo import plot_curves
    victim = tmp_path / "bashrc"
    victim.write_text("echo mine\n")
    (tmp_path / "val_top1.png").symlink_to(victim)
    with pytest.raises(errors.PldError, match="symbolic link"):
        plot_curves({"pld": [[(1, 50.0), (2, 60.0)]]}, str(tmp_path / "val_top1.png"), title="t")
    assert victim.read_text() == "echo mine\n"
    plot_curves({"pld": [[(1, 50.0), (2, 60.0)]]}, str(tmp_path / "fresh.png"), title="t")
    assert (tmp_path / "fresh.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("planted", ["sweep.json", "lr=0.1/summary.json", "lr=0.1/metrics.jsonl", "fifo", "nested"])
def test_report_checks_a_files_size_and_kind_before_reading_it(tmp_path, planted):
    """A sparse 64 GiB summary.json (no disk used, a tar can carry one) or a FIFO named sweep.json (opening
    it for reading would wait forever) are refused in one line; nothing is read past pld's limit."""
    sweep = sweep_folder(tmp_path / "sw", {"lr=0.1": {"lr": 0.1}})
    if planted == "fifo":  # every reader goes through files.read_bytes; `--resume` reads config.json unguarded
        os.mkfifo(sweep / "lr=0.1" / "config.json")
        with pytest.raises(errors.MetadataError, match="config.json: not a regular file"):
            files.read_json(str(sweep / "lr=0.1" / "config.json"))
        return
    if planted == "nested":  # deeper than Python's JSON parser recurses: was `internal error: RecursionError`
        (sweep / "lr=0.1" / "summary.json").write_text("[" * 200_000 + "]" * 200_000)
        code, output = run("report", sweep)
        assert code == 2 and "summary.json: not valid JSON (nested too deeply)" in one_error_line(output), output
        return
    with open(sweep / planted, "ab") as f:
        f.truncate(64 << 30)
    want = f"{os.path.basename(planted)}: 68,719,476,736 bytes, over the 67,108,864 pld reads of such a file"
    code, output = run("report", sweep)
    assert code == 2 and want in one_error_line(output), output


def test_names_and_settings_are_escaped_in_markdown_and_csv(tmp_path):
    hostile = "x\nimport os; os.system('touch pwned') | `rm` <img src=x>"
    names = {"run\nA|b": {"lr": 0.1, "student": hostile}, "runB": {"lr": 0.2, "student": "=HYPERLINK(\"http://e\")"}}
    sweep = sweep_folder(tmp_path / "sw", names)
    code, output = run("report", sweep)
    assert code == 0, output
    md = (sweep / "results.md").read_text().splitlines()
    table = md[:md.index("")] if "" in md else md
    assert len(table) == 2 + len(names)  # header, rule, one line per run: no cell broke its row
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    row = next(line for line in table if "touch pwned" in line)
    assert "\\|" in row and "\\`rm\\`" in row and "&lt;img src=x&gt;" in row and "<img" not in row
    assert row.count(" | ") == len(table[0].split(" | ")) - 1  # as many cells as the header
    with open(sweep / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr["0.1"]["student"] == hostile  # kept exactly, quoted by the csv module
    assert by_lr["0.2"]["student"] == "'=HYPERLINK(\"http://e\")"  # a formula is shown as text


def test_distill_out_refuses_a_folder_with_the_users_own_files(tiny_data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "metrics.csv").write_text("a,b\n1,2\n")
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", out, "--student", "cifar_resnet8",
                       "--loss", "ce", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                       "--size", "16")
    line = one_error_line(output)
    assert code == 2 and "files pld did not write" in line and "config.json" in line
    assert (out / "config.json").read_text() == '{"my": "settings"}' and sorted(os.listdir(out)) == ["config.json",
                                                                                                     "metrics.csv"]


RESUME_ARGS = ["--student", "cifar_resnet8", "--loss", "ce", "--epochs", "3", "--batch-size", "8", "--workers", "0",
               "--device", "cpu", "--size", "16", "--num-classes", "10"]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 3-epoch CE run: what --resume reads (and, honest, finds nothing left to train)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", out, *RESUME_ARGS)
    assert code == 0, output
    return out


def _epoch(s, v):
    s["epoch"] = v


def _one_epoch_past_the_end(s):
    """epoch 3 of --epochs 3 (0-based: a 4th epoch) with the 4-record history and best that go with it: every
    other check passes, so only the epoch's bound can refuse it (else: "done", nothing trained, exit 0)."""
    s["history"].append({**s["history"][-1], "epoch": 3})
    s["epoch"] = 3


def _copy_run(src, out):
    """A copy of a run folder that --resume accepts as the same run (its config records its own --out)."""
    import shutil
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["config"]["out"] = str(out)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("edit, what", [
    (lambda s: _epoch(s, -5), "last finished epoch -5 outside"),  # was: 5 epochs at negative learning rates, exit 0
    (lambda s: _epoch(s, 10**18), "last finished epoch 1000000000000000000 outside"),  # was: "done", nothing trained
    (lambda s: _epoch(s, "0"), "last finished epoch '0' outside"),  # was: internal error (TypeError)
    (lambda s: s.update(history="x"), "a history that is not 3 epoch records"),
    (lambda s: s.update(best=[1]), "a best-epoch record that is not one"),
    (lambda s: s["scheduler"].update(base_values=[-0.1]), "a learning-rate schedule other than"),
    (lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=1e6), "optimizer settings other than"),
    (lambda s: next(iter(s["optimizer"]["state"].values())).update(exp_avg=torch.zeros(3)),
     "optimizer state that does not fit the model"),
    (lambda s: s.clear(), "not a run state"),  # was: internal error (KeyError)
    (_one_epoch_past_the_end, r"last finished epoch 3 outside [0, 3)"),
], ids=["epoch -5", "epoch 1e18", "epoch '0'", "history", "best", "schedule", "weight decay", "state shape", "empty",
        "epoch 3 of 3"])
def test_an_edited_resume_state_is_refused_in_one_line(finished_run, tiny_data, tmp_path, edit, what):
    """last_state.pt is loaded weights_only (no code runs), but its values were trusted: a run folder from someone
    else could make --resume train with negative learning rates, exit 0."""
    out = _copy_run(finished_run, tmp_path / "run")
    state = torch.load(out / files.STATE_FILE, weights_only=True)
    edit(state)
    torch.save(state, out / files.STATE_FILE)
    before = (out / "last.safetensors").read_bytes()
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", out, *RESUME_ARGS, "--resume")
    line = one_error_line(output)
    assert code == 2 and what in line and "last_state.pt" in line, output
    assert (out / "last.safetensors").read_bytes() == before  # nothing trained or written


def test_an_honest_resume_state_passes_the_checks(finished_run, tiny_data, tmp_path):
    out = _copy_run(finished_run, tmp_path / "run")
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", out, *RESUME_ARGS, "--resume")
    assert code == 0, output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3 and (out / "last.safetensors").exists()


def test_distill_out_refuses_a_folder_with_an_unknown_file(tmp_path):
    from pld_pipeline.distill import _check_foreign_files
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="thesis.tex"):
        _check_foreign_files(str(tmp_path))
    (tmp_path / "thesis.tex").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"config": {"student": "s"}}))
    (tmp_path / "metrics.csv").write_text("")
    _check_foreign_files(str(tmp_path))  # a run pld started and that stopped before its first checkpoint


def test_a_run_folder_with_a_planted_link_is_refused_even_on_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "tensorboard").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "x.tar").write_bytes(b"")  # exists: the early --data check passes, the run folder's guard refuses
    code, output = run("distill", "--data", tmp_path / "x.tar", "--out", out, "--student", "cifar_resnet8", "--loss",
                       "ce", "--num-classes", "10", "--device", "cpu", "--resume")
    assert code == 2 and "symbolic links (tensorboard)" in one_error_line(output)
    assert not os.listdir(tmp_path / "elsewhere")


def test_checkpoints_are_written_through_the_safe_writer(tmp_path, monkeypatch):
    """A full disk while saving weights (safetensors) names the file and the bytes written; no temporary is left."""
    from pld_pipeline.distill import _save_weights
    model = torch.nn.Linear(64, 10)
    monkeypatch.setattr(files.os, "fdopen", _failing_fdopen(errno.ENOSPC, 1000))
    with pytest.raises(errors.WriteError, match=r"last.safetensors: no space left on device after writing 0 of "):
        _save_weights(model, str(tmp_path / "last.safetensors"), {"epoch": 0})
    assert os.listdir(tmp_path) == []


def image_folder(root):
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), 50 * i, np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_make_shards_refuses_to_overwrite_without_overwrite(tmp_path):
    src = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.json").write_text('{"class_names": ["mine"]}')
    code, output = run("make-shards", "folder", src, "--out", out, "--val-fraction", "0.5")
    assert code == 2 and "--overwrite" in one_error_line(output) and "classes.json" in output
    assert (out / "classes.json").read_text() == '{"class_names": ["mine"]}' and os.listdir(out) == ["classes.json"]
    code, output = run("make-shards", "folder", src, "--out", out, "--val-fraction", "0.5", "--overwrite")
    assert code == 0, output
    assert json.loads((out / "classes.json").read_text())["class_names"] == ["cats", "dogs"]
    code, output = run("make-shards", "folder", src, "--out", out, "--val-fraction", "0.5")
    assert code == 2 and "train-000000.tar" in output  # its own earlier output is not replaced silently either


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["meta", "batch"])
def test_a_hostile_cifar_pickle_is_refused_and_its_payload_not_run(tmp_path, where):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        doc = {"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        if where == "batch" and name == "data_batch_3":
            doc["labels"] = _Payload(marker)
        (src / name).write_bytes(pickle.dumps(doc, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    if where == "meta":
        meta["num_cases_per_batch"] = _Payload(marker)
    (src / "batches.meta").write_bytes(pickle.dumps(meta))
    code, output = run("make-shards", "cifar", src, "--out", tmp_path / "out")
    line = one_error_line(output)
    assert code == 2 and "refused to unpickle posix.system" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_official_style_cifar_pickles_still_load(tmp_path):
    """Protocol 2 (the official files are Python 2 pickles; Python 3 writes their bytes via _codecs.encode)."""
    from pld_pipeline.shards import cifar_arrays
    src = tmp_path / "c"
    src.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (src / name).write_bytes(pickle.dumps({b"batch_label": b"x", "data": data, "labels": [3, 1],
                                               "filenames": [b"a.png", b"b.png"]}, protocol=2))
    (src / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    images, labels, names = cifar_arrays(str(src), "test")
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 1] and images[1, 0, 0, 0] == 3072 % 256


def test_inspect_shows_a_caches_strings_as_text_not_markup(cache, monkeypatch):
    """Class names and teacher sources are a stranger's text: rich markup in them is printed, not obeyed."""
    import pld_pipeline.cache as cache_mod
    real = cache_mod.inspect_cache

    def hostile(url, **kwargs):
        info = real(url, **kwargs)
        info["class_names"] = ["[link=file:///etc/passwd]cat[/link]", "dog[/]"]
        for d in info["teachers"].values():
            d["source"] = "[b]x[/b]"
        return info

    monkeypatch.setattr(cache_mod, "inspect_cache", hostile)
    code, output = run("inspect", cache)
    assert code == 0, output
    assert "[link=file:///etc/passwd]cat[/link]" in output and "dog[/]" in output
    assert "[b]x[/b]" in output


# -- the loss guard ------------------------------------------------------------------------------------------------
def test_distill_stops_within_one_step_of_a_non_finite_loss_naming_the_unit(cache, tiny_data, tmp_path, monkeypatch):
    """A cached target made non-finite on the third batch (after the read checks, as an edit that slipped past
    them would be): the run stops at that step, names the sample's cache unit and saves nothing."""
    import pld_pipeline.student_data as SD
    real, calls, seen = SD.batch_targets, [], {}

    def poisoned(batch, *args, **kwargs):
        targets = real(batch, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            targets.logz[5] = float("nan")
            seen["unit"] = tuple(batch["source"][5].tolist())
        return targets

    monkeypatch.setattr(SD, "batch_targets", poisoned)
    out = tmp_path / "run"
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--cache", cache, "--out", out, "--student",
                       "cifar_resnet8", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                       "--quiet")
    line = one_error_line(output)
    shard, view = seen["unit"]
    assert code == 2 and "Non-finite loss" in line and "epoch 0, step 2" in line
    assert f"s{shard:06d} view {view}" in line and "teacher targets" in line
    assert line.count(" view ") == 1  # only the poisoned sample's unit, not the whole batch's
    assert not (out / "last.safetensors").exists() and not (out / "metrics.csv").exists()


def test_a_diverging_student_is_stopped_naming_the_step(tiny_data, tmp_path, monkeypatch):
    import pld_pipeline.distill as distill_mod
    real = distill_mod.create_loss

    def exploding(name, **kwargs):
        loss, count = real(name, **kwargs), [0]

        def fn(logits, y, targets, mix):
            count[0] += 1
            return loss(logits, y, targets, mix) * (float("inf") if count[0] == 2 else 1.0)
        return fn

    monkeypatch.setattr(distill_mod, "create_loss", exploding)
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", tmp_path / "r", "--student",
                       "cifar_resnet8", "--loss", "ce", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                       "--device", "cpu", "--size", "16", "--quiet")
    line = one_error_line(output)
    assert code == 2 and "Non-finite loss (inf) at epoch 0, step 1" in line and "--lr" in line


# -- every failure is one line -------------------------------------------------------------------------------------
def test_damage_found_in_a_dataloader_worker_keeps_its_type_and_message():
    class Damaged(torch.utils.data.IterableDataset):
        def __iter__(self):
            raise DamagedUnit("c.zarr", "s000001.samples", "checksum differs")
            yield

    loader = torch.utils.data.DataLoader(Damaged(), num_workers=1)
    with pytest.raises(DamagedUnit) as caught:
        list(worker_errors(loader))
    assert str(caught.value).startswith("c.zarr: unit s000001.samples is damaged: checksum differs.")
    assert "\n" not in str(caught.value)


def test_an_os_error_in_a_worker_keeps_its_errno():
    class Full(torch.utils.data.IterableDataset):
        def __iter__(self):
            raise OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
            yield

    with pytest.raises(OSError) as caught:
        list(worker_errors(torch.utils.data.DataLoader(Full(), num_workers=1)))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/tmp/x"
    assert errors.one_line(caught.value).startswith("no space left on device writing /tmp/x")


class ClientConnectorError(Exception):
    """Like aiohttp's: a constructor torch cannot call with one message, so torch re-raises a RuntimeError."""

    def __init__(self, key, error):
        super().__init__(f"Cannot connect to host {key} [{error}]")


def test_a_network_error_in_a_worker_is_one_line():
    class Remote(torch.utils.data.IterableDataset):
        def __iter__(self):
            raise ClientConnectorError("bucket.example:443", "Connect call failed")
            yield

    before = set(multiprocessing.active_children())
    with pytest.raises(errors.RemoteError) as caught:
        list(worker_errors(torch.utils.data.DataLoader(Remote(), num_workers=1)))
    assert errors.one_line(caught.value).startswith("Cannot connect to host bucket.example:443 [Connect call failed] "
                                                    "(ClientConnectorError in a data-loading worker)")
    # the worker is stopped with the error, not when the garbage collector frees the iterator (torch then waits
    # 5 s for it)
    assert set(multiprocessing.active_children()) <= before


def test_ctrl_c_while_waiting_for_a_batch_stops_the_loader_s_workers_at_once():
    """While a KeyboardInterrupt is handled (the run saving what it has, the message) its traceback holds the
    loader's iterator: its workers are stopped when it arrives, not when that traceback is freed."""
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            return itertools.count()

    before = set(multiprocessing.active_children())
    batches = worker_errors(torch.utils.data.DataLoader(Endless(), num_workers=1))
    assert int(next(batches)) == 0
    with pytest.raises(KeyboardInterrupt) as caught:
        batches.throw(KeyboardInterrupt)  # Ctrl-C, where the main process waits for the next batch
    assert set(multiprocessing.active_children()) <= before, caught.traceback[-1]


def _failing_fdopen(code, after):
    """os.fdopen whose file takes ``after`` bytes and then fails with ``code`` (a full or read-only disk)."""
    def fdopen(fd, *args, **kwargs):
        f = _REAL_FDOPEN(fd, *args, **kwargs)
        raw_write, room = f.write, [after]

        def write(data):
            if len(data) > room[0]:
                raw_write(bytes(data[:room[0]]))
                raise OSError(code, os.strerror(code))
            room[0] -= len(data)
            return raw_write(data)
        f.write = write
        return f
    return fdopen


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device after writing 0 of"),
                                         (errno.EROFS, "read-only file system")])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, code, words):
    sweep = sweep_folder(tmp_path / "sw", {"lr=0.1": {"lr": 0.1}})
    monkeypatch.setattr(files.os, "fdopen", _failing_fdopen(code, 0))
    code_, output = run("report", sweep)
    line = one_error_line(output)
    assert code_ == 2 and words in line and str(sweep / "results.csv") in line
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]  # the temporary file is removed


def test_a_full_disk_mid_file_names_how_much_was_written_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")
    monkeypatch.setattr(files.os, "fdopen", _failing_fdopen(errno.ENOSPC, 3))
    monkeypatch.setattr(files, "_CHUNK", 4)
    with pytest.raises(errors.WriteError, match=r"after writing 0 of 12 bytes") as caught:
        files.write_bytes(str(path), b"x" * 12)
    assert path.read_text() == "old" and "unchanged" in str(caught.value)
    monkeypatch.setattr(files.os, "fdopen", _failing_fdopen(errno.ENOSPC, 9))
    with pytest.raises(errors.WriteError, match=r"after writing 8 of 12 bytes"):
        files.write_bytes(str(path), b"x" * 12)
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_connection_refused_names_the_url_in_one_line_on_stderr():
    """In a subprocess: the HTTP session the failed read leaves open must not add asyncio's report at exit."""
    url = f"http://127.0.0.1:{free_port()}/c.zarr"
    proc = subprocess.run([sys.executable, "-m", "pld_pipeline", "inspect", url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {url}: cannot connect"), proc.stderr


def test_a_404_names_the_url(tmp_path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/missing-000000.tar"
        code, output = run("distill", "--data", url, "--out", tmp_path / "r", "--student", "cifar_resnet8", "--loss",
                           "ce", "--num-classes", "10", "--device", "cpu", "--workers", "0")
    finally:
        server.shutdown()
    assert code == 2 and one_error_line(output) == f"error: {url}: HTTP 404 (not found); check the URL and your access to it"


def test_s3_without_credentials_is_one_line_on_stderr_naming_the_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    proc = subprocess.run([sys.executable, "-m", "pld_pipeline", "inspect", "s3://no-such-bucket/c.zarr"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://no-such-bucket/c.zarr: "), proc.stderr
    assert "credentials" in lines[0]


@pytest.mark.parametrize("content, words", [
    ("{not json", "sweep.json: not valid JSON"),
    ('{"base": {}}', "sweep.json: field names missing"),
    ('{"names": []}', "sweep.json: field names invalid"),
    ('{"names": {"../../etc": {}}}', "field names.'../../etc' invalid"),
    ('{"names": {}}', "holds no runs"),
])
def test_malformed_or_empty_sweep_folders_are_one_line(tmp_path, content, words):
    (tmp_path / "sweep.json").write_text(content)
    code, output = run("report", tmp_path)
    assert code == 2 and words in one_error_line(output)


def test_a_malformed_summary_names_the_file_and_field(tmp_path):
    sweep = sweep_folder(tmp_path / "sw", {"a": {"lr": 1}}, {"a": {"best_val_top1": "high"}})
    code, output = run("report", sweep)
    line = one_error_line(output)
    assert code == 2 and "summary.json: field best_val_top1 invalid" in line


@pytest.mark.parametrize("field", ["best_val_top1", "train_seconds"])
def test_a_json_boolean_where_a_summary_holds_a_number_is_refused(tmp_path, field):
    """JSON true is a Python bool, and bool is an int: a summary saying best_val_top1: true was reported as 1."""
    sweep = sweep_folder(tmp_path / "sw", {"a": {"lr": 1}}, {"a": {"best_val_top1": 50.0, field: True}})
    code, output = run("report", sweep)
    assert code == 2 and f"summary.json: field {field} invalid (a bool)" in one_error_line(output)


def test_a_halving_trial_id_that_is_a_json_boolean_is_refused_not_read_as_trial_1(tmp_path):
    """halving.json {"trial_id": true} resumed trial 1: another run's trial, whose rungs it then reported into."""
    from pld_pipeline.errors import MetadataError
    from pld_pipeline.halving import TRIAL_FILE, Halving, HalvingRule, open_study
    sweep, mine = tmp_path / "sw", tmp_path / "sw" / "b"
    mine.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"names": {}, "scheduler": HalvingRule(1, 2).to_dict()}))
    study = open_study(str(sweep), HalvingRule(1, 2))
    study.ask(), study.ask()  # trials 0 and 1: another two runs', both running
    (mine / TRIAL_FILE).write_text(json.dumps({"trial_id": True}))
    with pytest.raises(MetadataError, match=r"halving.json: field trial_id invalid \(a bool\)"):
        Halving.for_run(str(sweep), str(mine), [])


def test_a_malformed_sweep_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text("[base]\nepochs = \n")
    code, output = run("sweep", bad, "--print-commands", "--out", tmp_path / "sw")
    line = one_error_line(output)
    assert code == 2 and "s.toml: not valid TOML" in line and "line 2" in line


def test_cache_teacher_refuses_batch_size_zero_before_creating_anything(tmp_path):
    out = tmp_path / "c.zarr"
    (tmp_path / "x.tar").write_bytes(b"")  # exists: the early --data check passes, the batch size is refused
    code, output = run("cache-teacher", "--data", tmp_path / "x.tar", "--out", out, "--teacher", "cifar_resnet8",
                       "--batch-size", "0", "--device", "cpu")
    assert code == 2 and "--batch-size must be >= 1" in one_error_line(output) and not out.exists()


def test_a_garbage_claim_file_holds_nothing(tmp_path):
    import zarr
    from pld_pipeline.cache import claims
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    for garbage in (b"\x00garbage", b"[1, 2]", b'{"owner": "x", "expires": "soon"}'):
        (tmp_path / "c.zarr" / "claims").mkdir(exist_ok=True)
        (tmp_path / "c.zarr" / "claims" / "s000000.json").write_bytes(garbage)
        assert claims.read_claim(root, 0) is None and not claims.held_by_other(root, 0, "me")


def test_explain_turns_outside_failures_into_one_line():
    assert errors.one_line(ValueError("invalid literal for int() with base 10: 'x'")) == \
        "'x' is not a number where one is expected"
    assert "permission denied: /srv/out" in errors.one_line(PermissionError(errno.EACCES, "Permission denied",
                                                                             "/srv/out"))
    assert errors.one_line(TimeoutError("read")).startswith("timed out")
    line = errors.one_line(KeyError("teachers"))
    assert line == "internal error: KeyError: 'teachers'; rerun with PLD_DEBUG=1 for the traceback"


def test_an_unexpected_error_is_one_line_and_pld_debug_shows_the_traceback(tmp_path, monkeypatch):
    import pld_pipeline.sweep as sweep_mod

    def broken(sweep_dir):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(sweep_mod, "report", broken)
    code, output = run("report", tmp_path)
    assert code == 2 and one_error_line(output) == ("error: internal error: ZeroDivisionError: division by zero "
                                                    "second line; rerun with PLD_DEBUG=1 for the traceback")
    result = runner.invoke(app, ["report", str(tmp_path)], env={"PLD_DEBUG": "1"})
    assert isinstance(result.exception, ZeroDivisionError)


# -- a shared sweep folder adopts only the runs its own sweep started --------------------------------------------
def _sweep_args(tiny_data, out):
    sets = [a for k, v in (("loss", "ce"), ("epochs", 3), ("batch_size", 8), ("workers", 0), ("device", "cpu"),
                           ("num_classes", 10)) for a in ("--set", f"{k}={v}")]
    return ["sweep", "--data", tiny_data["train"].pattern, "--out", out, "--grid", "seed=0", "--student",
            "cifar_resnet8", *sets, "--quiet"]


def _plant_run(finished_run, sweep_dir, name="seed=0", summary=False):
    """A stranger's run folder, planted at its last epoch (weights of their choice, a history they wrote)."""
    planted = _copy_run(finished_run, sweep_dir / name)
    if not summary:
        (planted / files.SUMMARY_FILE).unlink()
    return planted


@pytest.mark.parametrize("summary", [False, True], ids=["resumable state", "finished"])
def test_a_run_folder_planted_in_a_shared_sweep_folder_is_never_adopted(finished_run, tiny_data, tmp_path, summary):
    """A planted last_state.pt at the last epoch used to be "finished" without training, and a planted
    summary.json skipped the run and reported the stranger's history."""
    sweep_dir = tmp_path / "shared"
    sweep_dir.mkdir()
    planted = _plant_run(finished_run, sweep_dir, summary=summary)
    before = (planted / "last.safetensors").read_bytes()
    code, output = run(*_sweep_args(tiny_data, sweep_dir))
    line = one_error_line(output)
    assert code == 2 and "not a run this sweep started" in line and "seed=0" in line, output
    assert (planted / "last.safetensors").read_bytes() == before and not (sweep_dir / "results.md").exists()


def test_a_planted_run_in_a_sweep_the_user_started_is_refused_on_rerun_and_resume(finished_run, tiny_data, tmp_path):
    """The sweep ran once (sweep.json holds its id), then a stranger planted a run: the rerun, and the printed
    command's `pld distill --sweep ... --resume`, both refuse it."""
    from pld_pipeline.sweep import parse_grid, parse_settings, pending_commands
    sweep_dir = tmp_path / "shared"
    settings = parse_settings([f"data={tiny_data['train'].pattern}", "student=cifar_resnet8", "loss=ce", "epochs=3",
                               "batch_size=8", "workers=0", "device=cpu", "num_classes=10"])
    pending_commands(settings, parse_grid(["seed=0"]), [], str(sweep_dir))  # the user's sweep, not yet run
    _plant_run(finished_run, sweep_dir)
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", sweep_dir / "seed=0", *RESUME_ARGS,
                       "--sweep", sweep_dir, "--resume")
    assert code == 2 and "not a run this sweep started" in one_error_line(output), output
    with pytest.raises(errors.MetadataError, match="not a run this sweep started"):
        pending_commands(settings, parse_grid(["seed=0"]), [], str(sweep_dir))


def test_a_sweep_json_of_another_user_is_not_trusted(tmp_path, monkeypatch):
    """Whoever can write the folder can read and copy the id: the id is taken only from the user's own file."""
    from pld_pipeline.sweep import sweep_nonce
    (tmp_path / "sweep.json").write_text(json.dumps({"names": {}, "nonce": "0" * 32}))
    assert sweep_nonce(str(tmp_path)) == "0" * 32
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(errors.MetadataError, match="belongs to another user") as e:
        sweep_nonce(str(tmp_path))
    assert "\n" not in str(e.value)


def test_tracking_ids_planted_in_a_folder_are_never_continued(tmp_path):
    """A planted tracking.json made `--log mlflow` write metrics and tags into another team's MLflow run: a fresh
    run ignores a folder's ids, and a sweep's ids must record the sweep's id."""
    from pld_pipeline.tracking import Tracker, read_ids
    (tmp_path / "tracking.json").write_text(json.dumps({"tensorboard": "theirs", "mlflow": "their-run"}))
    fresh = Tracker((), str(tmp_path), "run", {}, reuse_ids=False)
    assert "mlflow" not in fresh.ids
    with pytest.raises(errors.MetadataError, match="tracking ids this sweep did not write"):
        read_ids(str(tmp_path), nonce="1" * 32)


def test_a_resume_state_at_the_last_epoch_needs_the_runs_summary(finished_run, tiny_data, tmp_path):
    out = _copy_run(finished_run, tmp_path / "run")
    (out / files.SUMMARY_FILE).unlink()
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", out, *RESUME_ARGS, "--resume")
    assert code == 2 and "at the last epoch without the run's summary.json" in one_error_line(output), output


def test_a_resume_state_larger_than_the_run_can_write_is_refused_before_loading(finished_run, tiny_data, tmp_path,
                                                                                  monkeypatch):
    out = _copy_run(finished_run, tmp_path / "run")
    with open(out / files.STATE_FILE, "r+b") as f:
        f.truncate(1 << 40)  # a sparse terabyte: torch.load would read it
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    code, output = run("distill", "--data", tiny_data["train"].pattern, "--out", out, *RESUME_ARGS, "--resume")
    assert code == 2 and "more than the" in one_error_line(output) and "last_state.pt" in output, output


# -- every file a user names is read through the one bounded reader ----------------------------------------------
def _fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("make", [lambda p: "/dev/zero", _fifo, lambda p: str(p)],
                         ids=["/dev/zero", "a FIFO", "a folder"])
def test_a_class_map_or_sweep_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, make):
    """--class-map /dev/zero used 4.3 GB then printed "internal error: MemoryError"; a FIFO hung."""
    from pld_pipeline.class_map import ClassMapError, load_class_map
    from pld_pipeline.sweep import load_sweep_file
    path = make(tmp_path)
    with pytest.raises(ClassMapError, match="not a regular file") as e:
        load_class_map(path, 10)
    assert path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(errors.MetadataError, match="not a regular file"):
        load_sweep_file(path)


def test_a_class_map_with_a_5000_digit_integer_names_the_file(tmp_path):
    from pld_pipeline.class_map import ClassMapError, load_class_map
    path = tmp_path / "map.json"
    path.write_text("[" + "9" * 5000 + "]")
    with pytest.raises(ClassMapError) as e:
        load_class_map(str(path), 10)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# -- shards and images: bounded members, no surprise decompression, bounded pixels -----------------------------------
def _tar_bytes(members, claim=None):
    """An uncompressed tar of (name, bytes) members; ``claim``: the size the last header claims instead."""
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if claim is not None:  # rewrite the last header's size field (and its checksum) as an attacker would
        import tarfile as t
        *_, last = t.open(fileobj=io.BytesIO(data)).getmembers()
        info = t.TarInfo(last.name)
        info.size = claim
        header = info.tobuf(format=t.GNU_FORMAT)[:512]
        data = data[:last.offset] + header + data[last.offset + 512:]
    return data


def _png_header(width, height):
    """The first bytes of a PNG that claims ``width`` x ``height`` pixels (what PIL reads before decoding)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_tar_member_larger_than_pld_reads_is_refused_from_its_header(tmp_path):
    """A 14 MB gzip-compressed .tar held a 3 GiB member (3.9 GB RSS)."""
    import gzip

    from pld_pipeline.data import DataError, iter_shard
    raw = _tar_bytes([("a.cls", b"1"), ("a.png", b"x" * 600)], claim=3 << 30)
    for name, data in (("plain.tar", raw), ("asked.tar.gz", gzip.compress(raw))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match="3,221,225,472 bytes, more than the") as e:
            list(iter_shard(str(tmp_path / name)))
        assert name in str(e.value) and "\n" not in str(e.value)


def test_a_compressed_tar_is_read_only_when_its_name_asks_for_it(tmp_path):
    import gzip

    from pld_pipeline.data import DataError, iter_shard
    raw = _tar_bytes([("a.cls", b"1"), ("a.png", b"x")])
    (tmp_path / "sneaky.tar").write_bytes(gzip.compress(raw))
    (tmp_path / "asked.tgz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="not an uncompressed tar") as e:
        list(iter_shard(str(tmp_path / "sneaky.tar")))
    assert "\n" not in str(e.value)
    assert [s["__key__"] for s in iter_shard(str(tmp_path / "asked.tgz"))] == ["a"]


def test_a_tar_with_a_duplicate_member_is_one_line_naming_it(tmp_path):
    """Was a Python tuple: ("s3.png: duplicate file name in tar file png dict_keys([...])", None, None)."""
    from pld_pipeline.data import DataError, iter_shard
    (tmp_path / "dup.tar").write_bytes(_tar_bytes([("s3.png", b"x"), ("s3.png", b"y")]))
    with pytest.raises(DataError, match="holds member 's3.png' twice") as e:
        list(iter_shard(str(tmp_path / "dup.tar")))
    assert "dict_keys" not in str(e.value) and "None" not in str(e.value) and "\n" not in str(e.value)


def test_an_image_claiming_more_pixels_than_pld_decodes_is_refused_before_decoding():
    """A 143 KB PNG of 12000x12000 decoded to 2.3 GB with only a warning."""
    from pld_pipeline.views import ImageTooLarge, decode_image
    with pytest.raises(ImageTooLarge, match="12000x12000 pixels, more than the 89,478,485"):
        decode_image(_png_header(12000, 12000))
    with pytest.raises(ImageTooLarge):
        decode_image(_png_header(20000, 20000))  # past twice the cap: PIL's own error, as one line


# -- make-shards folder: links are not followed out of the tree, non-images are skipped and counted -----------------
def test_make_shards_folder_packs_only_the_trees_own_images(tmp_path):
    """A linked "jpg" once packed /etc/passwd into a shard."""
    from pld_pipeline.data import iter_shard
    src = image_folder(tmp_path / "imgs")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(secret / "theirs.png")
    (src / "cats" / "passwd.jpg").symlink_to(secret / "passwd")  # a linked file
    (src / "cats" / "theirs.png").symlink_to(secret / "theirs.png")  # a linked image
    (src / "cats" / "elsewhere").symlink_to(secret, target_is_directory=True)  # a linked folder inside a class
    (src / "zebras").symlink_to(secret, target_is_directory=True)  # a linked class folder
    (src / "dogs" / "notes.jpg").write_text("not an image")  # a file that does not decode as one
    code, output = run("make-shards", "folder", src, "--out", tmp_path / "out", "--val-fraction", "0")
    assert code == 0, output
    assert "skipped: 4 link(s)" in output and "1 file(s) that are not images" in output
    samples = list(iter_shard(str(tmp_path / "out" / "train-000000.tar")))
    assert len(samples) == 4 and all(s["png"].startswith(b"\x89PNG") for s in samples)
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["class_names"] == ["cats", "dogs"]


def test_make_shards_out_never_writes_through_a_hard_link(tmp_path):
    """A hard link planted at train-000000.tar in --out shares the victim's file: truncating it rewrote the victim."""
    src = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    os.link(victim, out / "train-000000.tar")
    code, output = run("make-shards", "folder", src, "--out", out, "--val-fraction", "0", "--overwrite")
    assert code == 0, output
    assert victim.read_text() == "mine" and (out / "train-000000.tar").stat().st_ino != victim.stat().st_ino
