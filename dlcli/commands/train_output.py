"""How `dlcli train` shows a run on a terminal: the banner, and Ctrl-C / SIGTERM ending it with a checkpoint."""
import os
import signal
import sys
from pathlib import Path

from rich.markup import escape

from dlcli import run_files
from dlcli.callbacks import Callback
from dlcli.errors import plural


class Banner(Callback):
    """Run directory, dataset and split sizes, parameters, seed: printed once the run exists, before epoch 1."""

    def __init__(self, out, config_arg, resume_arg=None):
        self.out, self.config_arg, self.resume_arg = out, config_arg, resume_arg

    def on_run_begin(self, run):
        self.run = run
        out, cfg, model, sizes = self.out, run.config, run.model, run.sizes
        if run.config_changes:
            out.print("config changes accepted for this resume:\n" + "\n".join(run.config_changes), markup=False)
        what = str(self.config_arg or "")
        if self.resume_arg is not None:  # a K-fold run's folds each begin with this banner: the resumed run, not the fold
            resumed = Path(self.resume_arg)
            what = f"{what} --resume {resumed}".strip() + ("" if self.config_arg else
                                                             f" (config {run_files.RunDir(resumed).config})")
        out.print(f"[bold]dlcli train[/] {escape(what)}  ->  {escape(str(run.dir))}", markup=True)
        out.print(f"  data    {cfg.data.get('type')} from {run.data.source}: train {sizes['train']:,}, "
                  f"validation {sizes['validation']:,}, test {test_set(cfg, sizes['test'])}", markup=False)
        if run.data.extra.get("folder"):
            from dlcli.data.folders import banner_lines

            for line in banner_lines(run.data.extra["folder"]):
                out.print(f"  files   {line}", markup=False)
        if run.data.extra.get("feature_space"):
            from dlcli.data.table import describe_lines

            for line in describe_lines(run.data.extra["feature_space"]):
                out.print(f"  feature {line}", markup=False)
            if run.data.extra.get("label_rows_dropped"):
                out.print(f"  label   {run.data.extra['label_rows_dropped']} rows without a label left out",
                          markup=False)
        source = run.data.x_train.describe()
        if source.get("workers"):
            out.print(f"  decode  {source['workers']} threads, {run.data.x_train.prefetch} batches ahead, "
                      f"cache {source['cache']}" + (f" ({source['cache_file']})" if source.get("cache_file") else ""))
        elif source.get("memory_mapped"):
            out.print(f"  mmap    {source['memory_mapped']} ({source['bytes'] / 2**20:,.0f} MiB, read per batch)",
                      markup=False)
        out.print(f"  model   {model.name}: {model.count_params():,} parameters "
                  f"({sum(p.value.size for p in model.trainable_weights):,} trainable)")
        opt = model.optimizer.get_config()
        rate = opt["learning_rate"] if "learning_rate" in opt else "per weight: optimizer_map"  # MultiOptimizer
        out.print(f"  train   {plural(cfg.train.epochs, 'epoch')} x batch {cfg.train.batch_size}, "
                  f"optimizer {opt.get('type')} (learning rate {rate}), seed {cfg.seed}")
        world = run.world
        if world.size > 1:
            batch = cfg.train.batch_size
            low, high = batch // world.size, -(-batch // world.size)
            out.print(f"  ranks   {world.size} MPI processes ({world.local_size} on this node), each with "
                      f"{low if low == high else f'{low}-{high}'} samples of every global batch of {batch}")
        if run.init_from is not None:
            out.print(f"  init    weights from {run.init_from} (fresh optimizer and counters)")
        if run.resumed is not None:
            out.print(f"  resume  {run.resumed}; appending to {run.files.history}")

    def on_train_end(self, logs=None):
        decoded = self.run.data.x_train.describe()
        if decoded.get("decoded"):  # where a folder run's input time went
            rate = decoded["decode_images_per_second_per_thread"]
            self.out.print(f"input: decoded {decoded['decoded']:,} images of the training folder at {rate:,.0f} "
                           f"images/s per thread ({decoded['workers']} threads; cache {decoded['cache']})",
                           markup=False)


class StopOnSignal(Callback):
    """Ctrl-C and a polite kill (SIGTERM: a cancelled CI job, a scheduler) both finish the batch and save; a second
    signal stops at once. `signum` is the signal that stopped the run, for the exit code."""

    signum = None

    def on_run_begin(self, run):
        def on_signal(signum, frame):
            if run.stopping:  # a second signal: stop now, without the checkpoint the first one asked for
                from dlcli.checkpoint import describe_position

                last = run.position
                saved = (f"`{resume_command(run)}` continues from the last checkpoint, {describe_position(last)}"
                         if last else "no checkpoint had been written: start it again")
                print(f"\n{signal.Signals(signum).name} again: stopping now; nothing more was saved ({saved})",
                      file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            self.signum = signum
            run.stop("interrupted")
            print(f"\n{signal.Signals(signum).name}: finishing this batch, then saving a checkpoint "
                  f"(Ctrl-C again to abort)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)


def test_set(config, samples: int) -> str:
    """Which test set a run's figures are on (for a Config): the whole test split, or its first data.test_limit
    samples."""
    limit = config.data.get("test_limit")
    if not samples:
        return "0 samples (no test split)"
    if limit is None or samples < limit:
        return f"{samples:,} samples (the full test split)"
    return f"{samples:,} samples (the first {limit:,} of the test split: data.test_limit)"


def print_evaluation(out, result: dict, weights: str, split: str):
    """`dlcli evaluate`'s report: the metrics, a time series' comparison with its baseline, the confusion matrix."""
    from rich.table import Table

    from dlcli.commands.base import metrics_table

    out.print(metrics_table(f"{result['run']}: {split} split, {result['samples']:,} samples, {weights} weights",
                            result["metrics"]))
    print_comparison(out, result.get("comparison"))
    if "confusion_matrix" in result:
        names = result["classes"]
        cm = Table(title="confusion matrix (rows: true class, columns: predicted)")
        cm.add_column("class")
        for n in names:
            cm.add_column(n[:8], justify="right")
        cm.add_column("accuracy", justify="right")
        for n, row in zip(names, result["confusion_matrix"]):
            acc = result["per_class_accuracy"][n]
            cm.add_row(n, *[str(v) for v in row], "-" if acc is None else f"{acc:.3f}")
        out.print(cm)


def print_comparison(out, comparison: dict | None):
    """The model's MAE beside its data's common-sense baseline (experiment.baseline_comparison)."""
    if comparison:
        verdict = "beats" if comparison["beats_baseline"] else "does NOT beat"
        out.print(f"MAE in {comparison['units']} units: model {comparison['model_mae']:.4f}, common-sense baseline "
                  f"({comparison['baseline']}) {comparison['baseline_mae']:.4f}: the model {verdict} the baseline "
                  f"({comparison['improvement']:+.1%})", markup=False)


def print_baseline(out, test: dict, extra: dict):
    """After training: the test MAE beside the baseline, for data that has one (time series, regression tables)."""
    if extra and extra.get("baseline"):
        from dlcli.experiment import baseline_comparison

        print_comparison(out, baseline_comparison(test, extra, "test"))


def print_kfold(out, run):
    """A finished K-fold run's report: per epoch the mean and spread of each validation metric across folds, and the
    epoch where the mean is best (the epoch count to train the final model on all the data for). An unfinished one
    says which folds finished: a mean over some folds is not the K-fold estimate."""
    import csv

    from rich.table import Table

    k = run.config.train.kfold
    if run.status != "completed":
        statuses = runs_meta(run.dir).get("folds") or []
        done = [str(i + 1) for i, status in enumerate(statuses) if status == "completed"]
        out.print(f"{k}-fold validation {run.status} in fold {len(statuses)} of {k}; finished: "
                  f"{'folds ' + ', '.join(done) if done else 'no fold'} (each in {run_files.RunDir(run.dir).folds}/N). "
                  f"The mean across folds and the epoch to train the final model for come once every fold has finished.",
                  markup=False)
        return
    with open(run_files.RunDir(run.dir).kfold_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    names = [k for k in rows[0] if k.startswith("val_") and not k.endswith("_std")]
    table = Table(title=f"{k}-fold validation: mean +- standard deviation across folds")
    table.add_column("epoch", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(r["epoch"], *[f"{float(r[n]):.4f} +- {float(r[n + '_std']):.4f}" for n in names])
    out.print(table)
    if run.best_epoch is not None:
        out.print(f"best mean {'val_loss' if 'val_loss' in names else names[0]} at epoch {run.best_epoch}: train the "
                  f"final model on all the data for that many epochs (--set train.kfold=null "
                  f"--set train.epochs={run.best_epoch})")


def runs_meta(run_dir) -> dict:
    from dlcli import run_files

    return run_files.read_json(run_files.RunDir(run_dir).meta) if run_files.RunDir(run_dir).meta.is_file() else {}


def resume_command(run) -> str:
    """The command that continues `run`: a fold's K-fold run as a whole, under the launcher a data-parallel run was
    started with (the same rank count resumes bit-identically)."""
    command = f"dlcli train --resume {run.kfold_dir or run.dir}"
    world = run.world
    if world is not None and world.size > 1:
        launcher = "srun" if "SLURM_JOB_ID" in os.environ else "mpiexec"
        command = f"{launcher} -n {world.size} {command} --distributed"
    return command


def report_interrupted(run):
    """Where the checkpoint is and the command that resumes it (stderr), then the run directory (stdout)."""
    from dlcli import checkpoint
    from dlcli.commands.base import console

    console(stderr=True).print(
        f"interrupted at {checkpoint.describe_position(run.position or {'epoch': 0, 'batch': 0, 'step': 0})}; "
        f"checkpoint saved in {run.checkpoint}\nresume with: {resume_command(run)}", markup=False)
    print(run.dir)


def print_table_features(out, data):
    """A table run's input vector block by block (each feature's preprocessing and width), adapted on the training
    split, with the columns left out and any inferred features section; nothing for other data."""
    from rich.table import Table

    from dlcli.data import dataset_type, features, table as tables, table_file

    if not dataset_type(data).rows:
        return

    state = tables.feature_state(data)
    blocks = Table(title=f"input features (total width {state['width']})")
    for col, justify in (("feature", "left"), ("preprocessing", "left"), ("width", "right")):
        blocks.add_column(col, justify=justify)
    for name, what, width in features.describe(state):
        blocks.add_row(name, what, str(width))
    out.print(blocks)
    if state.get("ignored_columns"):
        out.print(f"ignored columns (not in data.features): {', '.join(state['ignored_columns'])}")
    if state.get("inferred"):
        out.print("features: auto inferred (paste into data.features to keep or edit it):\n"
                  + "\n".join(table_file.inferred_yaml(state)), markup=False, highlight=False)
