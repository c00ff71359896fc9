"""Render the library's progress events: a rich bar on a terminal, plain log lines otherwise, or nothing."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """A callable taking the library's ``{"event": ...}`` dicts."""

    def __init__(self, quiet: bool = False, rank: int = 0) -> None:
        self.quiet = quiet or rank != 0
        self.rank = rank
        self.live = err.is_terminal and not self.quiet
        self.progress: Progress | None = None
        self.task = None
        self.done = 0
        self.total = 0
        self.shards = 0
        self.t0 = time.perf_counter()
        self.last_log = 0.0
        self.n_shards = 0
        self.skipped_shards = 0
        self.shards_total = 0
        self.epochs_kept = 0  # distill: epochs finished, whose checkpoints are in the run folder
        self.rows_kept: dict[str, tuple[int, int]] = {}  # cache-teacher: shard in progress -> (rows saved, of)
        self.ctrl_c_pending = False  # a Ctrl-C not yet seen handled: see keeping_ctrl_c

    @contextlib.contextmanager
    def keeping_ctrl_c(self) -> Iterator[None]:
        """Ctrl-C raises KeyboardInterrupt in whatever Python runs at that moment; inside a finalizer or a weakref
        callback (the garbage collector runs them anywhere) Python prints "Exception ignored" and carries on, and
        a run the user stopped ran to its end. Here the signal is also remembered, and the next progress event
        raises it again unless that KeyboardInterrupt is already being handled (the run saving what it has)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_ctrl_c(signum: int, frame: Any) -> None:
            self.ctrl_c_pending = True
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def interrupted(self, message: str) -> None:
        """Ctrl-C: stop the bar and say what was kept and how to go on, on a line of its own (not glued to the
        bar, and ending in a newline so the shell prompt starts on the next line)."""
        bar, self.progress = self.progress, None
        if bar is not None:
            try:
                bar.stop()
            except Exception:  # noqa: BLE001 - Ctrl-C cut the bar's own start or stop short: rich finds its render
                err.show_cursor(True)  # hook already gone (IndexError); the message below is what must get out
        if self.rank == 0:
            print(f"\n{message}", file=sys.stderr, flush=True)

    def cache_teacher_interrupted(self) -> None:
        kept = self.skipped_shards + self.shards
        rows, of = (sum(r[i] for r in self.rows_kept.values()) for i in (0, 1))
        partial = (f", and {rows:,} of {of:,} rows of the {len(self.rows_kept)} shard(s) in progress (every finished "
                   "row: at most one row's views per shard are computed again)") if self.rows_kept else ""
        self.interrupted(f"interrupted: {kept} of {self.shards_total} shard(s) cached and kept{partial}; rerun the "
                         "same command to resume")

    def distill_interrupted(self, out: str) -> None:
        if not self.epochs_kept:
            self.interrupted("interrupted before the first epoch finished: nothing kept; rerun the same command to "
                             "start again")
        else:
            self.interrupted(f"interrupted: {self.epochs_kept} finished epoch(s) kept in {out}; rerun with --resume "
                             f"to continue from there")

    def __call__(self, event: dict[str, Any]) -> None:
        if self.ctrl_c_pending:
            self.ctrl_c_pending = False
            if not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # the first one was swallowed
                raise KeyboardInterrupt
        kind = event["event"]
        self._count(kind, event)
        if self.quiet:
            return
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(event)

    def _count(self, kind: str, e: dict[str, Any]) -> None:
        """What an interruption keeps, counted even when quiet."""
        if kind == "start":
            self.n_shards, self.skipped_shards = e["shards"], e.get("skipped_shards") or 0
            self.shards_total = e.get("shards_total", self.n_shards + self.skipped_shards)
        elif kind == "shard_done":
            self.shards += 1
            self.rows_kept.pop(e["shard"], None)
        elif kind in ("rows_saved", "resuming_shard"):
            self.rows_kept[e["shard"]] = (e["rows"], e["of"])
        elif kind == "train_start":
            self.epochs_kept = e.get("resumed_epoch") or 0
        elif kind == "epoch_end":
            self.epochs_kept = e["epoch"] + 1

    def _log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # cache-teacher ------------------------------------------------------------------------------
    def _on_indexing(self, e: dict[str, Any]) -> None:
        self._log(f"indexing {e['shards']} shard(s) (sample counts and content hashes)")

    def _on_repairing(self, e: dict[str, Any]) -> None:
        self._log(f"re-checked the existing units: {len(e['units'])} damaged, rewriting them")
        for name, why in e["units"]:
            self._log(f"  {name}: {why}")

    def _on_waiting(self, e: dict[str, Any]) -> None:
        if time.perf_counter() - self.last_log > 30:
            self.last_log = time.perf_counter()
            self._log(f"waiting for {e['for']}")

    def _on_resuming_shard(self, e: dict[str, Any]) -> None:
        self._log(f"resuming shard {e['shard']} at row {e['rows']:,} of {e['of']:,} (rows saved by an earlier run)")

    def _on_progress_refused(self, e: dict[str, Any]) -> None:
        self._log(f"shard {e['shard']}: the saved rows of an earlier run are not used ({e['why']}); computing it whole")

    def _on_start(self, e: dict[str, Any]) -> None:
        self.total, self.t0 = e["items"], time.perf_counter()
        if e.get("skipped_shards"):
            self._log(f"resuming: {e['skipped_shards']} shard(s) already complete")
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>8.0f} views/s"), TextColumn("shards {task.fields[shards]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
            self.task = self.progress.add_task("cache-teacher", total=self.total, rate=0.0,
                                               shards=f"0/{e['shards']}")
            self.progress.start()

    def _on_batch(self, e: dict[str, Any]) -> None:
        self.done += e["items"]
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        if self.progress is not None:
            self.progress.update(self.task, advance=e["items"], rate=rate)
        elif time.perf_counter() - self.last_log > 10:
            self.last_log = time.perf_counter()
            self._log(f"cache-teacher {self.done}/{self.total} views, {rate:.0f} views/s")

    def _on_shard_done(self, e: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, shards=f"{self.shards}/{self.n_shards}")
        else:
            self._log(f"shard {e['shard']} written ({self.shards}/{self.n_shards})")

    def _on_end(self, e: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()

    # sweep --------------------------------------------------------------------------------------
    def _on_run_epoch(self, e: dict[str, Any]) -> None:
        """One live line per run on a terminal; one log line per finished epoch otherwise."""
        epochs = e["epochs"] if e["epochs"] is not None else "?"
        eta = "-" if e["eta_s"] != e["eta_s"] else _clock(e["eta_s"])
        val = "-" if e["val_top1"] != e["val_top1"] else f"{e['val_top1']:.2f}"
        text = f"epoch {e['epoch']}/{epochs}  loss {e['train_loss']:.4f}  val top-1 {val}  ETA {eta}"
        if not self.live:
            self._log(f"{e['name']}: {text}")
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), TextColumn("{task.fields[text]}"), console=err)
            self.progress.start()
            self.run_tasks: dict[str, Any] = {}
        if e["name"] not in self.run_tasks:
            self.run_tasks[e["name"]] = self.progress.add_task(e["name"], text=text)
        self.progress.update(self.run_tasks[e["name"]], text=text)

    def stop(self) -> None:
        """Leave a live display (the sweep's lines stay on screen)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # distill ------------------------------------------------------------------------------------
    def _on_train_start(self, e: dict[str, Any]) -> None:
        self.t0 = time.perf_counter()
        self._log(f"distill: {e['loss']} | student {e['student']} ({e['params'] / 1e6:.2f}M params) | "
                  f"{e['epochs']} epoch(s) | device {e['device']} | world {e['world_size']}")
        if e.get("resumed_epoch"):
            done = e["resumed_epoch"]  # epochs already trained; the epoch lines count from 0
            self._log(f"resumed: {done} epoch(s) already trained, continuing with epoch {done}")

    def _on_epoch_start(self, e: dict[str, Any]) -> None:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:>6.0f} img/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
            self.task = self.progress.add_task("train", total=e.get("steps"), epoch=e["epoch"], loss=0.0, rate=0.0)
            self.progress.start()

    def _on_step(self, e: dict[str, Any]) -> None:
        if self.progress is not None:
            # step events come every few batches: the bar (and its ETA) counts batches, not events
            self.progress.update(self.task, completed=e["step"] + 1, loss=e["loss"], rate=e["samples_per_s"])

    def _on_epoch_end(self, e: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        val = (f"val_top1 {e['val_top1']:.2f}  val_top5 {e['val_top5']:.2f}  val_loss {e['val_loss']:.4f}  "
               if e.get("val_top1") == e.get("val_top1") else "")  # NaN: not evaluated this epoch
        self._log(f"epoch {e['epoch']}: train_loss {e['train_loss']:.4f}  {val}{e['epoch_seconds']:.1f}s "
                  f"({e['samples_per_s']:.0f} img/s)")
