"""What `pld` shows while it works: the distill bar counts batches (its ETA is right), Ctrl-C says how to resume."""
import io
import sys

import pytest
from rich.console import Console

import pld_pipeline_cli.progress as progress
from pld_pipeline_cli.progress import ProgressReporter


def terminal(monkeypatch, width=120):
    buf = io.StringIO()
    monkeypatch.setattr(progress, "err", Console(file=buf, force_terminal=True, width=width))
    return buf


def test_the_distill_bar_counts_batches_not_progress_events(monkeypatch):
    """distill reports a step every 10 batches: counting events made the ETA 10x too long."""
    terminal(monkeypatch)
    reporter = ProgressReporter()
    reporter({"event": "epoch_start", "epoch": 0, "steps": 100})
    for step in range(0, 60, 10):
        reporter({"event": "step", "epoch": 0, "step": step, "loss": 1.0, "samples_per_s": 10.0})
    task = reporter.progress.tasks[0]
    assert (task.completed, task.total) == (51, 100)
    reporter.progress.stop()


def test_a_resumed_run_names_the_epoch_it_continues_with_as_the_epoch_lines_count(capsys):
    """Epoch lines count from 0 (`epoch 0: ...`, `epoch 1: ...`); after two trained epochs the next line is
    `epoch 2`, and the resume line must say so (it said "resumed after epoch 2": one too many)."""
    reporter = ProgressReporter()
    reporter({"event": "train_start", "loss": "pld", "student": "s", "params": 1e6, "epochs": 4, "device": "cpu",
              "world_size": 1, "resumed_epoch": 2})
    reporter({"event": "epoch_end", "epoch": 2, "train_loss": 1.0, "val_top1": float("nan"), "epoch_seconds": 1.0,
              "samples_per_s": 1.0})
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == "resumed: 2 epoch(s) already trained, continuing with epoch 2" and lines[2].startswith("epoch 2:")


def run_in_terminal(args, columns=80, timeout=120, env=None, signal_after=None):
    """Run `pld ARGS` (forked: tests/forked.py) in a pseudo-terminal ``columns`` wide (what a user's terminal gives
    rich); its output, with ANSI escapes removed, and its exit status. ``timeout`` only guards against a hang.
    ``signal_after=(text, signum)``: send signum once text appeared."""
    import fcntl
    import os
    import pty
    import re
    import select
    import struct
    import termios
    import time

    import forked
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = forked.Forked(args, env={**os.environ, "TERM": "xterm", **(env or {})}, terminal=slave)
    os.close(slave)
    chunks, sent, deadline = [], False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
            if signal_after and not sent and signal_after[0].encode() in b"".join(chunks):
                proc.send_signal(signal_after[1])
                sent = True
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text).replace("\r", ""), code


def test_inspect_never_cuts_the_digest_or_a_teacher_id_in_an_80_column_terminal(tiny_data, teacher_ckpt, tmp_path):
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    tid = "cifar_resnet8_from_the_long_named_checkpoint_v2"
    url = str(tmp_path / "c.zarr")
    digest = cache_teacher(CacheTeacherConfig(
        data=tiny_data["train"].shards[0], out=url, teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, tid)],
        views=1, size=16, k=3, batch_size=16, workers=0, device="cpu", recipe_overrides={"pad": 2}))["digest"]
    text, code = run_in_terminal(["inspect", url], columns=80)
    assert code == 0, text
    assert f"digest: {digest}" in text and "…" not in text, text
    assert f"teacher {tid}" in text
    assert all(len(line) <= 80 for line in text.splitlines() if "│" in line), text  # the tables fit


def _pld(*args):
    return [str(a) for a in args]


@pytest.mark.slow
def test_ctrl_c_in_distill_says_what_was_kept_and_to_rerun_with_resume(tiny_data, cache, tmp_path):
    import signal
    out = tmp_path / "run"
    text, code = run_in_terminal(_pld("distill", "--data", tiny_data["train"].pattern, "--cache", cache,
                                      "--student", "cifar_resnet8", "--out", out, "--epochs", 500, "--batch-size", 8,
                                      "--workers", 0, "--device", "cpu"),
                                 timeout=240, signal_after=("epoch 0:", signal.SIGINT))
    assert code == 130, text
    line = next(line for line in text.splitlines() if line.startswith("interrupted:"))
    assert "finished epoch(s) kept in" in line and line.endswith("rerun with --resume to continue from there"), text
    assert text.endswith("continue from there\n") and "Traceback" not in text  # the prompt starts on a new line
    kept = int(line.split()[1])
    state = __import__("torch").load(out / "last_state.pt", weights_only=True)
    assert state["epoch"] + 1 >= kept >= 1


@pytest.mark.slow
def test_ctrl_c_in_cache_teacher_says_what_was_kept_and_to_rerun_the_same_command(tiny_data, teacher_ckpt, tmp_path):
    """Off a terminal (plain log lines), so the test can wait for the first shard to be written."""
    import signal

    import forked
    proc = forked.Forked(_pld("cache-teacher", "--data", tiny_data["train"].pattern, "--out", tmp_path / "c.zarr",
                              "--teacher", "cifar_resnet8", "--teacher-checkpoint", teacher_ckpt, "--views", 256,
                              "--size", 16, "--top-k", 3, "--workers", 0, "--device", "cpu", "--batch-size", 64),
                         stdout=forked.PIPE, stderr=forked.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "written (1/" in line:
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    code = proc.wait(timeout=120)
    text = "".join(lines)
    assert code == 130, text
    written = text.count(" written (")  # the shards finished before the signal landed (1, rarely 2)
    assert f"interrupted: {written} of 3 shard(s) cached and kept" in text and text.endswith(
        "rerun the same command to resume\n"), text


def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_run_and_one_being_handled_is_not_raised_twice(
        monkeypatch):
    """Ctrl-C landing in a weakref callback is printed as "Exception ignored" and dropped by Python (a forked
    cache-teacher run went on to its end): the next progress event raises it again."""
    import gc
    import os
    import signal
    import weakref
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))

    class Batch:
        pass

    def ctrl_c_in_callback(_):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, inside the callback
            pass
    before = signal.getsignal(signal.SIGINT)
    reporter = ProgressReporter(quiet=True)
    with reporter.keeping_ctrl_c():
        batch = Batch()
        ref = weakref.ref(batch, ctrl_c_in_callback)
        del batch
        gc.collect()
        assert ref() is None and dropped == [KeyboardInterrupt]  # what Python did with it
        with pytest.raises(KeyboardInterrupt):
            reporter({"event": "batch", "items": 1})
        reporter({"event": "batch", "items": 1})  # once
        try:  # delivered: the run handles it (saves rows, emitting events) without a second interrupt
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):
                pass
            pytest.fail("no KeyboardInterrupt")
        except KeyboardInterrupt:
            reporter({"event": "rows_saved", "shard": "a.tar", "rows": 3, "of": 9})
        reporter({"event": "batch", "items": 1})
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_that_cuts_the_bar_s_start_short_still_says_what_was_kept(monkeypatch, capsys):
    """Ctrl-C inside rich's Live.start (an epoch's bar starting) left a bar whose stop() raised IndexError: the
    user read "internal error: IndexError: pop from empty list" instead of how to resume."""
    from rich.console import Console as RichConsole
    terminal(monkeypatch)
    reporter = ProgressReporter()
    reporter({"event": "epoch_end", "epoch": 0, "train_loss": 1.0, "val_top1": float("nan"), "epoch_seconds": 1.0,
              "samples_per_s": 1.0})

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(RichConsole, "push_render_hook", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        reporter({"event": "epoch_start", "epoch": 1, "steps": 5})
    reporter.distill_interrupted("run")
    assert capsys.readouterr().err.endswith(
        "interrupted: 1 finished epoch(s) kept in run; rerun with --resume to continue from there\n")


def test_ctrl_c_in_cache_teacher_counts_the_saved_rows_of_the_shards_in_progress(capsys):
    reporter = ProgressReporter(quiet=True)
    for event in ({"event": "start", "items": 1, "shards": 3, "shards_total": 4, "skipped_shards": 1},
                  {"event": "rows_saved", "shard": "a.tar", "rows": 256, "of": 2000},
                  {"event": "resuming_shard", "shard": "b.tar", "rows": 512, "of": 2000},
                  {"event": "rows_saved", "shard": "a.tar", "rows": 768, "of": 2000},
                  {"event": "rows_saved", "shard": "c.tar", "rows": 1000, "of": 1500},
                  {"event": "shard_done", "shard": "c.tar"}):
        reporter(event)
    reporter.cache_teacher_interrupted()
    assert capsys.readouterr().err == (
        "\ninterrupted: 2 of 4 shard(s) cached and kept, and 1,280 of 4,000 rows of the 2 shard(s) in progress (every "
        "finished row: at most one row's views per shard are computed again); rerun the same command to resume\n")
