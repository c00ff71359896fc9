"""Early stopping of hopeless sweep runs: asynchronous successive halving (ASHA), by Optuna's pruner.

The scheduler is Optuna's ``SuccessiveHalvingPruner``; this module only connects it to run directories.
A sweep with ``--scheduler halving`` records its knobs in ``sweep.json`` and keeps one Optuna study in a
journal file beside it (``halving.journal``: file-locked appends, so runs in other processes, on other
machines sharing the folder, or launched by SLURM from ``--print-commands`` lines all see one study). Each
run is one trial, its id kept in the run directory, so an interrupted run resumes the *same* trial. After each
evaluated epoch the run reports its validation top-1; at the rungs (``grace * reduction**i`` epochs) a run
not in the top ``1/reduction`` of the runs that reached that rung stops there, with the reason recorded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from .files import json_field, read_json, refuse_link, write_json

SCHEDULERS = ("none", "halving")
STUDY_FILE = "halving.journal"
TRIAL_FILE = "halving.json"
METRIC = "val_top1"


@dataclass(frozen=True)
class HalvingRule:
    grace_epochs: int = 1  # every run trains at least this many epochs (Optuna's min_resource)
    reduction_factor: int = 4  # keep the top 1/reduction_factor at each rung (Optuna's and Ray Tune's default)

    def __post_init__(self) -> None:
        if self.grace_epochs < 1 or self.reduction_factor < 2:
            raise ValueError(f"--grace-epochs must be >= 1 and --reduction-factor >= 2, got {self.grace_epochs} "
                             f"and {self.reduction_factor}.")

    def to_dict(self) -> dict[str, Any]:
        return {"name": "halving", **asdict(self)}


def read_rule(sweep_dir: str) -> HalvingRule | None:
    """The sweep's halving rule, or None when the sweep runs every configuration to the end."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sweep {sweep_dir} is not a sweep directory (no sweep.json); make it with `pld sweep`.")
    doc = read_json(path)
    scheduler = (doc.get("scheduler") if isinstance(doc, dict) else None) or {}
    if not isinstance(scheduler, dict) or scheduler.get("name") != "halving":
        return None
    return HalvingRule(json_field(scheduler, path, "grace_epochs", kind=int), json_field(scheduler, path, "reduction_factor", kind=int))


def open_study(sweep_dir: str, rule: HalvingRule) -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError("--scheduler halving needs Optuna: pip install 'pld-pipeline[halving]'.") from None
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
    optuna.logging.set_verbosity(logging.WARNING)
    path = os.path.join(sweep_dir, STUDY_FILE)
    refuse_link(path)  # the journal is appended to: never through a link planted in the sweep folder
    # The open(O_EXCL) lock works on network file systems (NFS), where a sweep's nodes share the folder.
    storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=rule.grace_epochs,
                                                    reduction_factor=rule.reduction_factor)
    return optuna.create_study(study_name="pld-sweep", storage=storage, direction="maximize", pruner=pruner,
                               load_if_exists=True)


class Halving:
    """One run's link to its sweep's halving study: ``check`` after each epoch says whether to stop, and why."""

    def __init__(self, sweep_dir: str, run_dir: str, rule: HalvingRule, history: list[dict[str, Any]]) -> None:
        import optuna
        self.rule = rule
        self.study = open_study(sweep_dir, rule)
        trial_path = os.path.join(run_dir, TRIAL_FILE)
        trial_id = None
        if os.path.isfile(trial_path):
            trial_id = json_field(read_json(trial_path), trial_path, "trial_id", kind=int)
            if self.study._storage.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:
                trial_id = None  # finished before (e.g. a stopped run continued by hand): a new trial
        if trial_id is None:
            self.trial = self.study.ask()
            os.makedirs(run_dir, exist_ok=True)
            write_json(trial_path, {"trial_id": self.trial._trial_id, "run": os.path.basename(os.path.normpath(run_dir))})
        else:
            self.trial = optuna.trial.Trial(self.study, trial_id)  # the same trial, resumed
        done = self.study._storage.get_trial(self.trial._trial_id).intermediate_values
        for row in history:  # epochs trained before this trial existed (a run resumed under a new sweep)
            if row["epoch"] + 1 not in done and row.get(METRIC) == row.get(METRIC):
                self.trial.report(row[METRIC], row["epoch"] + 1)

    @classmethod
    def for_run(cls, sweep_dir: str | None, run_dir: str, history: list[dict[str, Any]]) -> Halving | None:
        rule = read_rule(sweep_dir) if sweep_dir else None
        return cls(sweep_dir, run_dir, rule, history) if rule else None

    def check(self, epoch: int, value: float) -> str | None:
        """Report ``value`` (validation top-1 after ``epoch + 1`` epochs); the reason to stop, or None."""
        if value != value:  # not evaluated this epoch: nothing to compare
            return None
        step = epoch + 1
        self.trial.report(value, step)
        if not self.trial.should_prune():
            return None
        reached = sum(1 for t in self.study.get_trials(deepcopy=False)
                      if t.intermediate_values and max(t.intermediate_values) >= step)
        self.study.tell(self.trial, state=_pruned())
        return (f"halving: val top-1 {value:.2f} after {step} epoch(s) is not in the top 1/{self.rule.reduction_factor} "
                f"of the {reached} run(s) that reached epoch {step}")

    def complete(self, value: float) -> None:
        """The run trained to its last epoch. (A run that crashed leaves its trial RUNNING: its rerun resumes it.)"""
        self.study.tell(self.trial, value)


def _pruned() -> Any:
    import optuna
    return optuna.trial.TrialState.PRUNED
