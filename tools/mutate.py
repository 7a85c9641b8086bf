"""Mutation check: break the code in small plausible ways and show the tests catch each one.

Each mutant replaces one exact snippet of one file in a scratch copy of the checkout (the working tree is never
touched) and runs the tests that should notice; a mutant is caught when they fail. First the same tests run on
the unmutated copy and must pass: a test failing without its mutant proves nothing. These are the mutations a
review found the suite blind to (issue 10), the Fortran-order gradient-check trap, and the bugs planted in the
newer features that the suite missed (issue 28).

    python tools/mutate.py            # every mutant; prints a table and the score, exits 1 if any survives
    python tools/mutate.py --list     # the mutants, without running them
    python tools/mutate.py regularizer-l2-halved masking-backward   # some of them
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (file, original snippet, mutated snippet, tests that must catch it)
MUTANTS = {
    "regularizer-l2-halved": (
        "dlcli/engine/regularizers.py", "+ 2 * self.l2 * w", "+ self.l2 * w",
        ["tests/test_model_gradients.py"]),
    "conv-kernel-grad-assigned": (
        "dlcli/layers/conv.py", "self.kernel.grad += grads[:k].reshape(self.kernel.grad.shape)",
        "self.kernel.grad[...] = grads[:k].reshape(self.kernel.grad.shape)",
        ["tests/test_model_gradients.py"]),
    "masking-backward-ignores-mask": (
        "dlcli/layers/embedding.py", "        return grad * self.keep\n", "        return grad\n",
        ["tests/layers/test_embedding.py"]),
    "callback-state-not-restored": (
        "dlcli/checkpoint.py", 'cb.set_state(_join(entry["state"], arrays))', "pass",
        ["tests/test_resume.py::test_sigkill_mid_epoch_then_resume_is_bit_identical"]),
    "init-from-loads-nothing": (
        "dlcli/experiment.py",
        "            checkpoint.load_weights(path, model)\n            return path",
        "            return path",
        ["tests/test_resume.py::test_init_from_starts_fresh_from_weights"]),
    "download-checksum-unchecked": (
        "dlcli/data/download.py", "if got != content_sha256:", "if False:",
        ["tests/data/test_download.py::test_checksum_verification_with_synthetic_bytes"]),
    "orthogonal-fortran-order": (
        "dlcli/engine/initializers.py", "np.ascontiguousarray((self.gain", "np.asfortranarray((self.gain",
        ["tests/test_checks.py"]),
    "gradcheck-perturbs-a-copy": (
        "dlcli/diagnostics.py", "flat, grad = value.flat, analytic.reshape(-1)",
        "flat, grad = np.asfortranarray(value).reshape(-1), analytic.reshape(-1)",
        ["tests/test_checks.py"]),
    "divergence-rise-ignored": (
        "dlcli/trainer.py", 'self._diverged("rise"', 'print("rise"',
        ["tests/test_resume.py::test_a_finite_loss_blowing_up_is_divergence_not_completion"]),
    "run-name-unchecked": (
        "dlcli/config/specs.py", 'if isinstance(name, str) and (not RUN_NAME.fullmatch(name) or name in (".", "..")):',
        "if False:", ["tests/test_cli.py"]),
    "umask-ignored": (
        "dlcli/run_files.py", "os.fchmod(fd, 0o666 & ~_umask())", "pass", ["tests/test_run_files.py"]),
    "config-fingerprint-unchecked": (
        "dlcli/fingerprint.py", "    diff = changes(run_dir, config)\n", "    diff = []\n",
        ["tests/test_fingerprint.py"]),
    "predict-skips-preprocessing": (
        "dlcli/data/inputs.py", "x = dataset.preprocess(read_array(file, model, data, key))",
        "x = read_array(file, model, data, key)", ["tests/test_predict.py"]),
    "predict-text-ignores-vocabulary": (
        "dlcli/data/inputs.py", "return encode_texts(lines, run_files.read_json(vocabulary_file))",
        'return encode_texts(lines, {**run_files.read_json(vocabulary_file), "words": []})', ["tests/test_predict.py"]),
    "batchnorm-ignores-mask": (
        "dlcli/layers/normalization.py", "            if self.input_mask is not None:\n                mean, var, count",
        "            if False:\n                mean, var, count", ["tests/layers/test_normalization.py"]),
    "predict-invert-ignored": (
        "dlcli/data/inputs.py", "pixels = 255 - pixels", "pixels = pixels", ["tests/test_predict.py"]),
    # issue 28: bugs planted in the newer features that the suite missed
    "kfold-folds-of-positions": (
        "dlcli/data/split.py",
        'order = order[np.argsort(class_labels(y)[order], kind="stable")]',
        'order = np.argsort(class_labels(y)[order], kind="stable")',
        ["tests/data/test_split.py"]),
    "kfold-one-hot-labels-reshaped": (
        "dlcli/data/split.py",
        "return y.reshape(len(y), -1).argmax(1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(len(y))",
        "return y.reshape(len(y))",
        ["tests/data/test_split.py", "tests/test_kfold.py::test_kfold_run_with_one_hot_targets_stratifies_its_folds"]),
    "kfold-one-hot-not-stratified": (
        "dlcli/data/split.py",
        "return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1))",
        "return False",
        ["tests/test_kfold.py::test_kfold_run_with_one_hot_targets_stratifies_its_folds"]),
    "extends-null-sets-none": (
        "dlcli/extends.py",
        "            into.pop(key, None)\n",
        "            into[key] = None\n",
        ["tests/test_extends.py::test_mappings_merge_deeply_lists_and_scalars_replace_null_deletes"]),
    "fingerprint-counts-the-name": (
        "dlcli/fingerprint.py",
        'if k != "name" and a.get(k, missing) != b.get(k, missing)]',
        "if a.get(k, missing) != b.get(k, missing)]",
        ["tests/test_fingerprint.py::test_an_edited_name_alone_is_accepted_by_evaluate"]),
    "export-pixel-scale-ignores-rescale": (
        "dlcli/data/dataset.py",
        'return {"dlcli.pixel_scale": repr(self.conversion()[1])} if "rescale" in self.spec else {}',
        "return {}",
        ["tests/interop/test_onnx_export.py::test_export_metadata_of_an_npz_run_with_rescale_gives_its_pixel_scale"]),
    "export-vocabulary-looked-up-elsewhere": (
        "dlcli/interop/onnx_export.py",
        "vocabulary = run_files.RunDir(run_dir).vocabulary",
        'vocabulary = run_files.RunDir(run_dir).weights / "vocabulary.json"',
        ["tests/interop/test_onnx_export.py::test_export_metadata_of_a_text_run_holds_its_vocabulary"]),
    "export-inputs-renamed": (
        "dlcli/interop/onnx_export.py",
        "        name = t.node.layer.name\n",
        '        name = f"input_{len(graph_inputs)}"\n',
        ["tests/interop/test_onnx_export.py::test_export_command_writes_checked_file_with_metadata"]),
    "keras-module-prefix-only": (
        "dlcli/interop/keras_config.py",
        'KERAS_MODULE = re.compile(r"^keras(\\.[A-Za-z0-9_.]+)?$")',
        'KERAS_MODULE = re.compile(r"^keras[A-Za-z0-9_.]*$")',
        ["tests/interop/test_keras_import.py::test_custom_and_foreign_objects_are_refused_by_name"]),
    "zip-size-limit-only-at-high-ratio": (
        "dlcli/interop/keras_files.py",
        "    if info.file_size > limit:\n",
        "    if info.file_size > limit and info.file_size > MAX_RATIO * max(info.compress_size, 1):\n",
        ["tests/interop/test_keras_import.py::test_member_over_its_size_limit_is_refused_at_any_compression_ratio"]),
    "h5-declared-size-unchecked": (
        "dlcli/interop/keras_files.py",
        "if declared > MEMBER_LIMITS[WEIGHTS] or declared > MAX_RATIO * max(ds.id.get_storage_size(), 1) +"
        " RATIO_FLOOR:",
        "if declared > MEMBER_LIMITS[WEIGHTS]:",
        ["tests/interop/test_keras_import.py::test_hdf5_dataset_declaring_more_than_it_stores_is_refused"]),
    "image-cache-key-ignores-interpolation": (
        "dlcli/data/image_folder.py",
        "json.dumps([self.size, self.color_mode, self.interpolation, self.crop])",
        "json.dumps([self.size, self.color_mode, self.crop])",
        ["tests/data/test_image_folder.py::test_disk_cache_is_keyed_by_interpolation_and_crop"]),
    "image-cache-key-ignores-crop": (
        "dlcli/data/image_folder.py",
        "json.dumps([self.size, self.color_mode, self.interpolation, self.crop])",
        "json.dumps([self.size, self.color_mode, self.interpolation])",
        ["tests/data/test_image_folder.py::test_disk_cache_is_keyed_by_interpolation_and_crop"]),
    "text-folder-max-length-ignored": (
        "dlcli/data/text.py",
        "texts.append(text[:max_length] if max_length else text)",
        "texts.append(text)",
        ["tests/data/test_text_vectors.py::test_text_folder_max_length_cuts_characters_in_training_and_predict"]),
    "predict-text-folder-max-length-ignored": (
        "dlcli/data/text.py",
        'texts, _ = _read_text_files(files, "error", self.spec.get("max_length"))',
        'texts, _ = _read_text_files(files, "error", None)',
        ["tests/data/test_text_vectors.py::test_text_folder_max_length_cuts_characters_in_training_and_predict"]),
    "mmap-ignores-fortran-order": (
        "dlcli/data/mapped.py",
        'order="F" if fortran else "C"',
        'order="C"',
        ["tests/data/test_mapped.py::test_fortran_ordered_arrays_map_to_their_values"]),
    "rise-base-not-floored": (
        "dlcli/trainer.py",
        "return max(self.initial_loss, 1.0)",
        "return self.initial_loss",
        ["tests/test_trainer.py::test_the_rise_rule_measures_against_a_first_loss_of_at_least_one"]),
    "initial-loss-not-restored": (
        "dlcli/trainer.py",
        '                self.initial_loss = position.get("initial_loss")\n',
        "",
        ["tests/test_trainer.py::test_initial_loss_is_restored_on_resume"]),
    "diagnosis-names-the-last-nonfinite-layer": (
        "dlcli/divergence.py",
        "if self.forward_layer is None and not _finite(output):",
        "if not _finite(output):",
        ["tests/test_trainer.py::test_diagnose_names_the_first_layer_gone_non_finite_and_leaves_layers_untouched"]),
    "every-rank-writes-the-run": (
        "dlcli/run_files.py",
        "return cls(path) if world.is_root else NoRunDir(path)",
        "return cls(path)",
        ["tests/test_distributed.py::test_cli_two_ranks_write_one_run_equal_to_one_process"]),
    "resume-takes-streams-of-another-rank-count": (
        "dlcli/distributed.py",
        "if saved is not None and len(saved) == world.size:",
        "if saved is not None:",
        ["tests/test_distributed.py::test_resume_two_ranks_on_two_three_and_one"]),
    "sweep-trial-value-of-last-epoch": (
        "dlcli/sweep/trial.py", "    return min(values) if minimize else max(values)\n",
        "    return values[-1]\n",
        ["tests/test_sweep.py::test_each_trial_value_is_its_best_epoch_not_its_last"]),
    "sweep-trial-value-wrong-end": (
        "dlcli/sweep/trial.py", "    return min(values) if minimize else max(values)\n",
        "    return max(values) if minimize else min(values)\n",
        ["tests/test_sweep.py::test_each_trial_value_is_its_best_epoch_not_its_last"]),
    "sweep-kfold-reports-every-epoch": (
        "dlcli/sweep/trial.py", "        if self.fold is None:\n            self.trial.report(value, epoch)",
        "        if True:\n            self.trial.report(value, epoch)",
        ["tests/test_sweep.py::test_a_kfold_trial_reports_the_mean_of_its_folds_to_the_pruner_after_each_fold"]),
}


def scratch_copy(dest: Path):
    """The checkout's tracked and new files (not .git, not the venv), as the working tree has them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def check_snippets(names):
    """Every mutant's snippet occurs exactly once in its file, so each mutant changes what it says."""
    for name in names:
        file, old, _, _ = MUTANTS[name]
        count = (ROOT / file).read_text().count(old)
        if count != 1:
            raise SystemExit(f"mutant {name}: the snippet occurs {count} times in {file}; update MUTANTS")


def run_tests(tests: list[str], timeout: float, label: str, mutate=None) -> tuple[int | None, float, str]:
    """pytest on `tests` in a scratch copy, after `mutate(copy)`: (return code or None on timeout, seconds, the
    summary line)."""
    with tempfile.TemporaryDirectory(prefix=f"dlcli-mutant-{label}-") as outer:
        tmp = Path(outer) / ROOT.name
        scratch_copy(tmp)
        # the shared datasets sit beside the checkout (../shared), where the tests look for them: keep that
        # relation, or every test needing a real dataset skips and catches nothing
        shared = ROOT.parent / "shared"
        if shared.exists():
            (Path(outer) / "shared").symlink_to(shared)
        if mutate is not None:
            mutate(tmp)
        start = time.perf_counter()
        # python -m pytest puts the scratch copy first on sys.path, ahead of the editable install
        env = {**os.environ, "PYTHONPATH": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start, f"timed out after {timeout:.0f}s"
        return proc.returncode, time.perf_counter() - start, (proc.stdout.strip().splitlines() or [""])[-1]


def run_mutant(name: str, timeout: float) -> tuple[bool, float, str]:
    file, old, new, tests = MUTANTS[name]

    def mutate(copy: Path):
        text = (copy / file).read_text()
        (copy / file).write_text(text.replace(old, new))

    code, seconds, detail = run_tests(tests, timeout, name, mutate)
    if code is None:
        return False, seconds, f"{detail} (inconclusive: counts as not caught)"
    # caught only by a failing assertion: an error (a fixture's timeout on a loaded machine, an import error)
    # proves nothing about the mutant, so it counts as not caught
    return code != 0 and " failed" in detail and " error" not in detail, seconds, detail


def baseline(names, timeout: float) -> bool:
    """The mutants' tests, once, on the unmutated copy: they must pass for a failure under a mutant to mean
    anything."""
    tests = list(dict.fromkeys(t for n in names for t in MUTANTS[n][3]))
    code, seconds, detail = run_tests(tests, timeout * 3, "baseline")
    print(f"{'passes  ' if code == 0 else 'FAILS   '} {'(no mutant)':42} {seconds:6.1f}s  {detail}", flush=True)
    return code == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the mutants' tests without any mutant")
    args = parser.parse_args(argv)
    if args.list:
        for name, (file, _, _, tests) in MUTANTS.items():
            print(f"{name:42} {file:32} {' '.join(tests)}")
        return 0
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)}; see --list")
    names = args.names or list(MUTANTS)
    check_snippets(names)
    if not args.no_baseline and not baseline(names, args.timeout):
        print("the tests fail without any mutant: fix them first (or run with --no-baseline)")
        return 1
    survived = []
    for name in names:
        caught, seconds, detail = run_mutant(name, args.timeout)
        print(f"{'caught  ' if caught else 'SURVIVED'} {name:42} {seconds:6.1f}s  {detail}", flush=True)
        if not caught:
            survived.append(name)
    print(f"mutation score: {len(names) - len(survived)}/{len(names)} caught"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
