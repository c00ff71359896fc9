"""What `pld` shows while it works: the distill bar counts batches (its ETA is right), Ctrl-C says how to resume."""
import io

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
