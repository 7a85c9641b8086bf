"""Hyperparameter sweeps on Optuna: a config's `sweep:` section searched trial by trial, each trial an ordinary run.

- Every trial is `dlcli.train(the config resolved once, overrides=[the searched values])` into
  `runs/<study>/trial-NNN-<time>/`, so evaluate, predict, plot and `runs compare` work on it. Its value is the best
  epoch's `sweep.metric`. Editing the config file while a study runs changes no trial.
- The study lives in an Optuna storage: by default a journal file `runs/<study>/study.journal`, which several
  local processes share (Optuna's JournalFileBackend appends with a file lock); or any RDB URL
  (`postgresql://...`), which workers on many machines share. Starting again continues the study up to
  `sweep.trials` trials in all.
- A pruner stops a poor trial early from the metric reported after each epoch (the run's status says "pruned"); a
  k-fold trial reports after each fold instead (the mean so far of its folds' best values), see TrialReporter.
  A trial that fails or diverges is recorded as failed with its reason; the study goes on. What would fail every
  trial the same way (sweep.metric not in the epoch logs, a full disk) stops the sweep at once.
- A trial left running by a worker process that died (kill -9, out of memory) is recorded as failed, with a notice.
- The report: trials.csv, best.yaml (the best trial's resolved config), optimization_history.png and
  param_importances.png in `runs/<study>/`.

search.py: the study (storage, sampler, pruner, what it was started with); trial.py: one trial, an ordinary run;
workers.py: the processes sharing a study; report.py: trials.csv, best.yaml and the plots.
"""
from dlcli.sweep.report import SweepResult, report
from dlcli.sweep.search import Sweep, prepare
from dlcli.sweep.trial import TrialReporter, trial_value
from dlcli.sweep.workers import Claim, run_sweep, work

__all__ = ["Claim", "Sweep", "SweepResult", "TrialReporter", "prepare", "report", "run_sweep", "trial_value", "work"]
