"""Mutation check: does the suite notice one-line bugs? Not run by CI (minutes); run it after changing tests.

    python tests/mutations.py [--only NAME] [--json OUT]

Each mutation rewrites one snippet of the library (the snippet must occur exactly once), runs the tests that
should catch it, and restores the file whatever happens. The mutations are applied to a private copy of the tree
(the files git tracks or would track), never to the working tree: edits made there while a list runs are kept,
and tests run elsewhere never see a mutated library. A mutation the tests do not fail on is "alive": a
hole in the suite. Exit status 1 if any is alive.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


FAULTS = "tests/test_faults.py::"
MIX = "tests/test_mix.py::"
SWEEP = "tests/test_sweep.py::"
TRACK = "tests/test_tracking.py::"
HOSTILE = "tests/test_hostile_folders.py::"
EARLY = "tests/test_early_refusals.py::"
CACHE_ATTACK = "tests/test_hostile_cache.py::"
CMAP = "tests/test_class_map.py::"
MUTATIONS = [
    Mutation("halving keeps the worst runs (study minimises top-1)", "pld_pipeline/halving.py",
             'direction="maximize"', 'direction="minimize"',
             (SWEEP + "test_halving_stops_runs_outside_the_top_fraction_at_each_rung",)),
    Mutation("a resumed halving run opens a new trial", "pld_pipeline/halving.py",
             "if trial_id is None:\n            self.trial", "if True:\n            self.trial",
             (SWEEP + "test_an_interrupted_halving_run_resumes_its_own_trial",)),
    Mutation("a resumed run starts a new tracked run", "pld_pipeline/tracking.py",
             "self.ids = read_ids(folder)", "self.ids = {}",
             (TRACK + "test_distill_logs_to_tensorboard_mlflow_and_wandb_and_a_resume_continues_the_same_runs",)),
    Mutation("metrics logged one epoch off", "pld_pipeline/distill.py",
             "tracker.log_epoch(epoch, row)", "tracker.log_epoch(epoch + 1, row)",
             (TRACK + "test_distill_logs_to_tensorboard_mlflow_and_wandb_and_a_resume_continues_the_same_runs",)),
    Mutation("a printed command drops a boolean setting", "pld_pipeline/launch.py",
             "        elif isinstance(value, bool):\n            argv.append(flag)", "        elif isinstance(value, bool):\n            pass",
             (SWEEP + "test_printed_commands_are_the_sweep_runs",)),
    Mutation("a retried Ray task restarts its run", "pld_pipeline/launch.py",
             'return distill(DistillConfig(**_resuming(settings)))',
             'import shutil; shutil.rmtree(settings["out"], ignore_errors=True); return distill(DistillConfig(**{**settings, "resume": False}))',
             ("tests/test_ray.py",)),
    Mutation("student trains on view v with the targets of view v+1", "pld_pipeline/student_data.py",
             "item.update(topk_idx=np.stack([b.topk_idx[row, v, k]", "item.update(topk_idx=np.stack([b.topk_idx[row, (v + 1) % self.num_views, k]",
             ("tests/test_distill.py::test_every_student_input_is_paired_with_the_teachers_targets_for_that_exact_tensor",)),
    Mutation("student's image from view v+1, targets from view v", "pld_pipeline/student_data.py",
             "params = block.params[row, v]", "params = block.params[row, (v + 1) % self.num_views]",
             ("tests/test_distill.py::test_every_student_input_is_paired_with_the_teachers_targets_for_that_exact_tensor",)),
    Mutation("view RNG ignores the global seed", "pld_pipeline/views.py",
             "rng = view_rng(seed, key, view)", "rng = view_rng(0, key, view)",
             ("tests/test_cache_teacher.py::test_the_view_draw_depends_on_the_global_seed_key_and_view",)),
    Mutation("teacher accuracy compares the second-ranked class", "pld_pipeline/cache/encode.py",
             '"correct": targets.topk_idx[:, 0] == labels', '"correct": targets.topk_idx[:, 1] == labels',
             ("tests/test_cache_teacher.py::test_cached_values_equal_a_direct_teacher_forward_on_replayed_views",)),
    Mutation("verify's accuracy compares the second-ranked class", "pld_pipeline/cache/check.py",
             'correct=int((block["topk_idx"][..., 0] ==', 'correct=int((block["topk_idx"][..., 1] ==',
             (FAULTS + "test_a_near_chance_teacher_is_flagged_in_the_summary_inspect_and_verify",)),
    Mutation("inspect's tail mass counts only the top-1", "pld_pipeline/cache/check.py",
             "masses.append(np.clip(1.0 - np.exp(logp.astype(np.float64)).sum(-1)",
             "masses.append(np.clip(1.0 - np.exp(logp[..., :1].astype(np.float64)).sum(-1)",
             ("tests/test_cache.py::test_inspect_summarises_the_cache",)),
    Mutation("verify's label-consistency check disabled", "pld_pipeline/cache/check.py",
             "if (gap > delta * 2.0 ** -10 + 1e-5).any():", "if False:",
             ("tests/test_cache.py::test_verify_catches_semantic_damage_written_with_valid_checksums",)),
    Mutation("verify's descending-order check disabled", "pld_pipeline/cache/check.py",
             "if (np.diff(logp, axis=-1) > 1e-3).any():", "if False:",
             ("tests/test_cache.py::test_verify_catches_semantic_damage_written_with_valid_checksums",)),
    Mutation("DIST from top-k puts all the tail mass on one class", "pld_pipeline/losses.py",
             "dense = fill[:, None].expand(-1, self.num_classes)",
             "dense = torch.zeros_like(top[:, :1]).expand(-1, self.num_classes).clone(); dense[:, -1] = fill * rest",
             ("tests/test_losses.py::test_topk_dist_spreads_the_tail_mass_evenly",)),
    Mutation("--resume does not restore the EMA", "pld_pipeline/distill.py",
             'ema.load_state_dict(state["ema"])', "pass",
             (FAULTS + "test_distill_killed_mid_epoch_resumes_to_the_same_weights_and_ema",)),
    Mutation("unit marker written before the unit's data", "pld_pipeline/cache/cache.py",
             "            self._store(arr, path, unit, region, padded)\n"
             "            kill_point(\"unit.array\")\n"
             "            sums[path] = block_sha256(padded)\n",
             "            sums[path] = block_sha256(padded)\n"
             "        shard = self.meta.shards[unit.shard]\n"
             "        write_marker(self.root, unit.name, {\"binding\": fmt.unit_binding(unit.name, self.meta), \"shard\": unit.shard, \"shard_name\": shard.name, \"rows\": shard.nsamples, \"checksums\": dict(sums), **record})\n"
             "        for spec in schema.BY_KIND[unit.kind]:\n"
             "            path = spec.path(unit.teacher)\n"
             "            arr = self._array(path)\n"
             "            block = np.asarray(arrays[spec.name]).astype(arr.dtype, copy=False)\n"
             "            padded = np.full((s,) + block.shape[1:], arr.fill_value, dtype=arr.dtype)\n"
             "            padded[: block.shape[0]] = block\n"
             "            self._store(arr, path, unit, region, padded)\n"
             "            kill_point(\"unit.array\")\n",
             (FAULTS + "test_cache_teacher_killed_anywhere_resumes_to_the_uninterrupted_cache[unit.array:7]",)),
    Mutation("readers skip the per-array checksum", "pld_pipeline/cache/integrity.py",
             "if block_sha256(arr) != sums[path]:", "if False:",
             (FAULTS + "test_damaged_data_is_reported_and_refused[chunks swapped between views inside an object]",)),
    Mutation("readers skip the metadata binding", "pld_pipeline/cache/integrity.py",
             'if record.get("binding") != binding:', "if False:",
             (FAULTS + "test_edited_root_metadata_is_caught_by_every_reader_and_never_laundered[temperature grid reordered]",)),
    Mutation("distill skips the per-sample content digest", "pld_pipeline/student_data.py",
             "if block.digests[row].tobytes() != sample_digest(sample):", "if False:",
             (FAULTS + "test_a_shard_edited_in_the_middle_is_refused_naming_the_sample",)),
    Mutation("a claim expiring in the year 3000 holds its shard", "pld_pipeline/cache/claims.py",
             'and doc["expires"] <= time.time() + MAX_TTL)', "and True)",
             ("tests/test_cache.py::test_claims_that_expired_or_whose_local_worker_died_are_taken_over",)),
    Mutation("--overwrite checks only a cache's top level (a user's file inside teachers/ deleted)",
             "pld_pipeline/cache/target.py", "    if not others:  # every file below", "    if False:  # every file below",
             ("tests/test_hostile_cache.py::test_overwrite_deletes_only_a_pld_cache_whatever_the_url_scheme",)),
    Mutation("a rerun does not repair damaged units", "pld_pipeline/cache_teacher.py",
             "        if found.problems:\n            damaged.append", "        if False:\n            damaged.append",
             (FAULTS + "test_a_rerun_repairs_every_kind_of_damage_at_once",)),
    Mutation("a killed creation cannot be resumed", "pld_pipeline/cache/cache.py",
             "if root is None or fmt.ROOT_ATTR not in root.attrs:", "if root is None:",
             (FAULTS + "test_cache_teacher_killed_anywhere_resumes_to_the_uninterrupted_cache[create.arrays]",)),
    Mutation("worker errors keep torch's wrapper", "pld_pipeline/data.py",
             "        if match is None:\n            raise", "        if True:\n            raise",
             (FAULTS + "test_errors_inside_dataloader_workers_reach_the_user_as_one_line",)),
    Mutation("a teacher without declared preprocessing gets ImageNet defaults", "pld_pipeline/models.py",
             "    if missing:\n        raise ValueError(f\"Teacher", "    if False:\n        raise ValueError(f\"Teacher",
             (FAULTS + "test_a_teacher_that_declares_no_preprocessing_is_refused_naming_the_options",)),
    Mutation("--temperature 0 accepted", "pld_pipeline/distill.py",
             "if cfg.temperature is not None and not cfg.temperature > 0:", "if False:",
             (FAULTS + "test_out_on_a_regular_file_and_non_positive_temperatures_are_one_line_errors",)),
    Mutation("near-chance teachers never flagged", "pld_pipeline/cache/format.py",
             "return accuracy < chance + 0.1 * (1.0 - chance)", "return False",
             (FAULTS + "test_near_chance_means_within_a_tenth_of_the_way_from_chance_to_perfect",)),
    Mutation("PLD scores the student at the teacher temperature", "pld_pipeline/losses.py",
             "    return pld_loss_from_ranking(student_logits, labels, targets, reduction=reduction)\n\n\ndef create_loss",
             "    return pld_loss_from_ranking(student_logits / targets.temperature, labels, targets, reduction=reduction)\n\n\ndef create_loss",
             ("tests/test_losses.py",)),
    Mutation("mixup truncates instead of rounding", "pld_pipeline/views.py",
             "+ LAMBDA_ONE // 2) >> 16", ") >> 16",
             (MIX + "test_replay_is_integer_exact_mixup_and_cutmix",)),
    Mutation("a lambda of exactly 1/2 makes the partner dominant", "pld_pipeline/losses.py",
             "return torch.where(2 * self.lam >= 1,", "return torch.where(2 * self.lam > 1,",
             (MIX + "test_mixed_labels_in_the_losses",)),
    Mutation("PLD ranks a mixed view's own label first", "pld_pipeline/losses.py",
             "            labels = mix.dominant(labels)", "            labels = labels",
             (MIX + "test_mixed_labels_in_the_losses",)),
    Mutation("cache stores the sample's own label_logp for mixed views", "pld_pipeline/cache_teacher.py",
             "labels_dev = firsts.to(device, non_blocking=True).long()", "labels_dev = labels.to(device, non_blocking=True).long()",
             (MIX + "test_student_replay_equals_the_teachers_input_and_targets_equal_a_direct_forward",)),
    Mutation("student gets its own label as the partner's", "pld_pipeline/student_data.py",
             "item.update(label2=int(block.labels[partner_row]), lam=view_lambda(params))",
             "item.update(label2=label, lam=view_lambda(params))",
             (MIX + "test_student_replay_equals_the_teachers_input_and_targets_equal_a_direct_forward",)),
    Mutation("CutMix pastes the partner's box one row low", "pld_pipeline/views.py",
             "out[:, top:top + h, left:left + w] = other[:, top:top + h, left:left + w]",
             "out[:, top:top + h, left:left + w] = other[:, top + 1:top + h + 1, left:left + w]",
             (MIX + "test_replay_is_integer_exact_mixup_and_cutmix",)),
    Mutation("HTTP readers list instead of reading the unit index", "pld_pipeline/cache/store.py",
             "    if can_list(url):\n        return list_markers(root)", "    if True:\n        return list_markers(root)",
             ("tests/test_http.py",)),
    Mutation("a failed object write deletes an object that still reads", "pld_pipeline/cache/cache.py",
             "                try:\n                    arr[rows, views]\n                except Exception:  # noqa: BLE001 - crc32c or index mismatch: nothing in it can be read\n                    broken.append(",
             "                if True:\n                    broken.append(",
             ("tests/test_cache.py::test_views_of_one_data_shard_share_an_object_and_extension_keeps_the_earlier_ones",)),
    Mutation("hosts that ignore byte ranges are read as if they served them", "pld_pipeline/cache/store.py",
             'if url.startswith(("http://", "https://")) and not _serves_ranges(root):',
             'if url.startswith(("http://", "https://")) and False:',
             ("tests/test_http.py::test_a_host_that_ignores_byte_ranges_is_read_through_whole_objects",)),
    Mutation("the unit index lists a unit before its marker exists", "pld_pipeline/cache/cache.py",
             "        write_index(self.root, shard, [n for n in read_index(self.root, shard) or [] if n != name])\n        delete_marker(self.root, name)",
             "        delete_marker(self.root, name)",
             ("tests/test_http.py::test_a_withdrawn_unit_leaves_the_index_before_its_marker",)),
    # Issue 22: one-line bugs a user would meet, each with the test that now catches it.
    Mutation("val_top1 counts top-5 hits", "pld_pipeline/distill.py",
             "(topk[:, 0] == y).sum()", "(topk == y[:, None]).any(1).sum()",
             ("tests/test_distill.py::test_evaluation_counts_top1_and_top5_hits_apart",)),
    Mutation("--eval-every N evaluates after epochs 1, N+1, ...", "pld_pipeline/distill.py",
             "((epoch + 1) % cfg.eval_every == 0", "(epoch % cfg.eval_every == 0",
             ("tests/test_distill.py::test_eval_every_n_evaluates_after_epochs_n_2n_and_the_last",)),
    Mutation("a resumed run forgets its saved best", "pld_pipeline/distill.py",
             'state["epoch"] + 1, state["best"], state["history"]',
             'state["epoch"] + 1, {"val_top1": -1.0, "epoch": -1}, state["history"]',
             ("tests/test_distill.py::test_a_resumed_run_keeps_its_saved_best",)),
    Mutation("a checkpoint with EMA and plain weights loads the plain ones", "pld_pipeline/models.py",
             'for wrapper in ("state_dict_ema", "state_dict", "model"):',
             'for wrapper in ("state_dict", "state_dict_ema", "model"):',
             ("tests/test_models.py::test_a_checkpoint_with_ema_and_plain_weights_loads_the_ema",)),
    Mutation("claim expiry compared with time.monotonic()", "pld_pipeline/cache/claims.py",
             "now = time.time() if now is None else now", "now = time.monotonic() if now is None else now",
             ("tests/test_cache.py::test_claims_that_expired_or_whose_local_worker_died_are_taken_over",)),
    Mutation("a dead local worker's claim reads as held", "pld_pipeline/cache/claims.py",
             'return not _dead_here(str(claim.get("owner", "")))', "return True",
             ("tests/test_cache.py::test_claims_that_expired_or_whose_local_worker_died_are_taken_over",)),
    Mutation("--part 1/2 --overwrite no longer refused", "pld_pipeline/cache_teacher.py",
             "if part > 0 and cfg.overwrite:", "if False:",
             ("tests/test_cache_teacher.py::test_a_part_above_zero_with_overwrite_is_refused_and_deletes_nothing",)),
    Mutation("a started run's printed command lacks --resume", "pld_pipeline/launch.py",
             "argv = distill_argv(_resuming(absolute(settings)))", "argv = distill_argv(absolute(settings))",
             (SWEEP + "test_a_started_runs_printed_command_resumes_it",)),
    Mutation("the sweep's tracked parent names the worst run best", "pld_pipeline/sweep.py",
             'finish_sweep_parent(out, max(finished, key=lambda r: r["best_val_top1"]',
             'finish_sweep_parent(out, min(finished, key=lambda r: r["best_val_top1"]',
             (TRACK + "test_a_sweep_is_one_mlflow_parent_run_with_a_child_per_configuration",)),
    Mutation("DIST on mixed views ignores the partner's label", "pld_pipeline/losses.py",
             "    ce = _label_ce(s, labels, mix)\n    return _reduce(alpha * ce + relation, reduction)",
             "    ce = _label_ce(s, labels, None)\n    return _reduce(alpha * ce + relation, reduction)",
             (MIX + "test_dist_on_mixed_views_gives_the_partner_label_its_share",)),
    Mutation("--view-policy random draws one view for the whole run", "pld_pipeline/student_data.py",
             "return stable_int(seed, key, epoch) % num_views", "return stable_int(seed, key) % num_views",
             ("tests/test_distill.py::test_random_view_policy_draws_a_new_view_each_epoch_deterministically",)),
    Mutation("best.json written to a path with the run folder's name rewritten", "pld_pipeline/distill.py",
             'write_json(os.path.splitext(path)[0] + ".json", meta)',
             'write_json(path.replace(".safetensors", ".json"), meta)',
             ("tests/test_distill.py::test_a_run_folder_named_after_a_checkpoint_gets_its_files",)),
    Mutation("every loss trains with the wrong sign", "pld_pipeline/losses.py",
             'return entry.fn(student_logits, labels, targets, **params, **({} if mix is None else {"mix": mix}))',
             'return -entry.fn(student_logits, labels, targets, **params, **({} if mix is None else {"mix": mix}))',
             ("tests/test_distill.py::test_every_loss_trains_from_the_cache_and_writes_its_files",)),
    Mutation("parallel sweep jobs all train the first configuration", "pld_pipeline/launch.py",
             "futures = {pool.submit(run_one, settings): name for name, settings in runs.items()}",
             "futures = {pool.submit(run_one, {**next(iter(runs.values())), \"out\": settings[\"out\"]}): name for name, settings in runs.items()}",
             (SWEEP + "test_parallel_jobs_give_the_same_runs_as_sequential",)),
    Mutation("a cache over plain HTTP opened for writing", "pld_pipeline/cache/store.py",
             'if mode != "r" and url.startswith(("http://", "https://")):', "if False:",
             ("tests/test_sharing.py::test_a_cache_served_over_plain_http_is_read_only_and_trainable",)),
    Mutation("the cache digest ignores the unit markers", "pld_pipeline/cache/digest.py",
             '+ [f"units/{name}/zarr.json" for name in unit_names])', "+ [])",
             ("tests/test_digest.py::test_any_edit_a_reader_sees_changes_the_digest_even_re_signed[marker]",
              "tests/test_digest.py::test_any_edit_a_reader_sees_changes_the_digest_even_re_signed[stored value, re-signed]")),
    Mutation("--expect-digest not checked", "pld_pipeline/cache/cache.py",
             "digest.require(expected, digest.of(docs), self.url)", "None",
             ("tests/test_digest.py::test_expect_digest_refuses_in_one_line_before_anything_is_trained_or_written",
              "tests/test_digest.py::test_student_data_refuses_another_cache_before_reading_it")),
    Mutation("a pinned cache re-reads its markers", "pld_pipeline/cache/cache.py",
             "record = None if self._pinned is None else self._pinned.get(name, {})", "record = None",
             ("tests/test_digest.py::test_a_pinned_cache_reads_only_against_the_markers_it_hashed",)),
    Mutation("DataLoader workers hash the pinned cache again", "pld_pipeline/student_data.py",
             "                                 pinned=self._pins)", "                                 pinned=None)",
             ("tests/test_digest.py::test_data_loader_workers_read_against_the_markers_their_parent_hashed",)),
    Mutation("writers follow a symlink planted in a sweep folder", "pld_pipeline/files.py",
             "    if os.path.islink(path):\n        raise WriteError", "    if False:\n        raise WriteError",
             (HOSTILE + "test_report_refuses_a_symlink_planted_in_the_sweep_folder",
              HOSTILE + "test_print_commands_refuses_a_symlinked_sweep_json")),
    Mutation("Markdown cells not escaped", "pld_pipeline/sweep.py",
             'return re.sub(r"([\\\\|`\\[\\]])", r"\\\\\\1", text)', "return text",
             (HOSTILE + "test_names_and_settings_are_escaped_in_markdown_and_csv",)),
    Mutation("CSV formulas not neutralised", "pld_pipeline/sweep.py",
             'if isinstance(value, str) and value[:1] in', 'if False and value[:1] in',
             (HOSTILE + "test_names_and_settings_are_escaped_in_markdown_and_csv",)),
    Mutation("distill --out writes over the user's files", "pld_pipeline/distill.py",
             "    if foreign:\n        shown", "    if False:\n        shown",
             (HOSTILE + "test_distill_out_refuses_a_folder_with_the_users_own_files",
              HOSTILE + "test_distill_out_refuses_a_folder_with_an_unknown_file")),
    Mutation("make-shards overwrites without --overwrite", "pld_pipeline/shards.py",
             "if overwrite or not os.path.isdir(out_dir):", "if True:",
             (HOSTILE + "test_make_shards_refuses_to_overwrite_without_overwrite",)),
    Mutation("CIFAR batches unpickled without restriction", "pld_pipeline/shards.py",
             'doc = _CifarUnpickler(f, encoding="latin1").load()', 'doc = pickle.load(f, encoding="latin1")',
             (HOSTILE + "test_a_hostile_cifar_pickle_is_refused_and_its_payload_not_run",)),
    Mutation("a non-finite loss trains on", "pld_pipeline/distill.py",
             "        if bool(flag):\n            return", "        if True:\n            return",
             (HOSTILE + "test_a_diverging_student_is_stopped_naming_the_step",
              HOSTILE + "test_distill_stops_within_one_step_of_a_non_finite_loss_naming_the_unit")),
    Mutation("the loss guard names every unit of the batch", "pld_pipeline/distill.py",
             "(source if rows is None else source[rows])", "source",
             (HOSTILE + "test_distill_stops_within_one_step_of_a_non_finite_loss_naming_the_unit",)),
    Mutation("worker errors lose their type (DamagedUnit becomes RuntimeError)", "pld_pipeline/data.py",
             "rebuilt = errors.rebuild(match.group(1), message) or errors.rebuild_os_error(message)", "rebuilt = None",
             (HOSTILE + "test_damage_found_in_a_dataloader_worker_keeps_its_type_and_message",
              HOSTILE + "test_an_os_error_in_a_worker_keeps_its_errno")),
    Mutation("the CLI catches only ValueError (other failures print tracebacks)", "cli/app.py",
             "        except Exception as e:  # noqa: BLE001 - the one place", "        except ValueError as e:  # noqa: BLE001 - the one place",
             (HOSTILE + "test_an_unexpected_error_is_one_line_and_pld_debug_shows_the_traceback",
              HOSTILE + "test_connection_refused_names_the_url_in_one_line_on_stderr")),
    Mutation("inspect renders a cache's strings as rich markup", "cli/app.py",
             'tt.add_row(escape(tid), escape(str(d["source"])),', 'tt.add_row(tid, str(d["source"]),',
             (HOSTILE + "test_inspect_shows_a_caches_strings_as_text_not_markup",)),
    Mutation("a full disk is not named with what was written", "pld_pipeline/files.py",
             "        if e.errno in (errno.ENOSPC, errno.EDQUOT):", "        if False:",
             (HOSTILE + "test_a_full_or_read_only_disk_is_one_line_naming_the_file",
              HOSTILE + "test_a_full_disk_mid_file_names_how_much_was_written_and_keeps_the_old_file")),
    Mutation("views.py imports torch at import time (pld --help, inspect, verify pay ~830 MB)", "pld_pipeline/views.py",
             "import numpy as np\n\nif TYPE_CHECKING:", "import numpy as np\nimport torch\n\nif TYPE_CHECKING:",
             ("tests/test_startup.py::test_light_commands_do_not_import_torch",)),
    Mutation("the CLI builds its loss help from the torch registry", "cli/app.py",
             "from pld_pipeline.loss_names import BUILTIN_LOSSES as LOSSES", "from pld_pipeline.losses import LOSSES",
             ("tests/test_startup.py::test_light_commands_do_not_import_torch",)),
    Mutation("audit tolerance ignores the recorded precision (bf16's for every cache)", "pld_pipeline/audit.py",
             "tol = TOLERANCE[rec.precision]", 'tol = TOLERANCE["bf16"]',
             ("tests/test_audit.py::test_a_forged_cache_fails_naming_keys",)),
    Mutation("audit compares every view with view 0's cached targets", "pld_pipeline/audit.py",
             "block.topk_idx[r, v].astype(np.int64), block.topk_logp[r, v]",
             "block.topk_idx[r, 0].astype(np.int64), block.topk_logp[r, 0]",
             ("tests/test_audit.py::test_an_honest_cache_passes_every_view",)),
    Mutation("audit ignores the log-partition", "pld_pipeline/audit.py",
             "and dlabel <= tol and dlogz <= tol", "and dlabel <= tol",
             ("tests/test_audit.py::test_an_edited_and_resigned_cache_fails_on_exactly_the_edited_views",)),
    Mutation("audit draw ignores --seed", "pld_pipeline/audit.py",
             "rng = np.random.default_rng(seed)", "rng = np.random.default_rng(0)",
             ("tests/test_audit.py::test_an_honest_cache_passes_every_view",)),
    Mutation("hostile cache: foreign codecs decoded (no allow-list)", "pld_pipeline/cache/codecs.py",
             "if names is None or tuple(names) != allowed:", "if names is None:",
             (CACHE_ATTACK + "test_a_foreign_codec_in_a_v3_array_is_refused_before_any_chunk",)),
    Mutation("hostile cache: zarr format 2 stores opened", "pld_pipeline/cache/store.py",
             'fmt3 = {} if mode == "w" else {"zarr_format": 3}', "fmt3 = {}",
             (CACHE_ATTACK + "test_a_zarr_v2_store_with_a_pickle_codec_is_refused_before_any_chunk",)),
    Mutation("hostile cache: k not checked against the classes", "pld_pipeline/cache/bounds.py",
             "_int_in(url, f\"k of teacher '{tid}'\", t.k, 1, meta.num_classes)", "pass",
             (CACHE_ATTACK + "test_sizes_in_the_metadata_are_checked_before_anything_is_allocated[k > classes]",)),
    Mutation("hostile cache: rows_per_shard not held to the largest shard", "pld_pipeline/cache/bounds.py",
             "if meta.rows_per_shard != max(s.nsamples for s in meta.shards):", "if False:",
             (CACHE_ATTACK + "test_sizes_in_the_metadata_are_checked_before_anything_is_allocated[rows not the largest shard]",)),
    Mutation("hostile cache: array chunking not checked", "pld_pipeline/cache/bounds.py",
             "if [outer, None if inner is None else list(inner)] not in [list(x) for x in layouts]:", "if False:",
             (CACHE_ATTACK + "test_sizes_in_the_metadata_are_checked_before_anything_is_allocated[chunk shape]",)),
    Mutation("hostile cache: teacher values not checked at read time", "pld_pipeline/cache/values.py",
             "        if bad.any():\n            return what", "        if False:\n            return what",
             (CACHE_ATTACK + "test_values_no_honest_writer_stores_are_refused_where_they_are_read",)),
    Mutation("hostile cache: writers follow symlinks inside a cache", "pld_pipeline/cache/target.py",
             "if os.path.islink(os.path.join(folder, name)):", "if False:",
             (CACHE_ATTACK + "test_a_symlink_planted_inside_a_cache_is_refused_by_writers",)),
    Mutation("hostile cache: --overwrite deletes a non-pld group", "pld_pipeline/cache/target.py",
             "if not isinstance(attrs, dict) or not ({ROOT_ATTR, CREATING_ATTR} & set(attrs)):", "if False:",
             (CACHE_ATTACK + "test_overwrite_deletes_only_a_pld_cache_whatever_the_url_scheme",)),
    Mutation("hostile cache: repair opens the url recorded in the cache", "pld_pipeline/cache_teacher.py",
             "jobs.append(_Job(s, urls[s], rec.nsamples,", "jobs.append(_Job(s, rec.url, rec.nsamples,",
             (CACHE_ATTACK + "test_a_pipe_url_recorded_in_the_cache_is_never_run_by_repair_or_extension",)),
    Mutation("hostile cache: units beyond num_views accepted", "pld_pipeline/cache/cache.py",
             "return unit.views is None or 0 <= unit.views[0] < unit.views[1] <= num_views", "return True",
             (CACHE_ATTACK + "test_num_views_edited_down_is_no_longer_ok",)),
    Mutation("tables squeezed to 80 columns outside a terminal (model names cut)", "cli/app.py",
             "    if out.is_terminal:\n        out.print(table)", "    if True:\n        out.print(table)",
             ("tests/test_cli.py::test_tables_print_in_full_outside_a_terminal",)),
    Mutation("audit guesses a normalisation the cache does not record", "pld_pipeline/audit.py",
             'if not prep.get("mean") or not prep.get("std") or rec.precision not in TOLERANCE:',
             'if rec.precision not in TOLERANCE:',
             ("tests/test_audit.py::test_a_cache_that_does_not_record_the_normalisation_is_refused_not_guessed",)),
    Mutation("class map: group masses not renormalised", "pld_pipeline/class_map.py",
             "log_q = log_m - log_den[:, None]", "log_q = log_m",
             (CMAP + "test_mapped_full_targets_are_the_renormalised_group_mass",)),
    Mutation("class map: the top class, not the true label, weighs PLD's first step", "pld_pipeline/class_map.py",
             "label_log_q = log_q.gather(1, labels[:, None]).squeeze(1)",
             "label_log_q = log_q.gather(1, top.indices[:, :1]).squeeze(1)",
             (CMAP + "test_losses_on_mapped_targets_match_brute_force_values_and_gradients",)),
    Mutation("class map: a teacher class claimed by two student classes accepted", "pld_pipeline/class_map_spec.py",
             "            if c in owner:", "            if False:",
             (CMAP + "test_bad_maps_are_refused_in_one_line_naming_the_entry",)),
    Mutation("class map: an index the teacher lacks accepted", "pld_pipeline/class_map_spec.py",
             "if not 0 <= m < num_teacher_classes:", "if m < 0:",
             (CMAP + "test_bad_maps_are_refused_in_one_line_naming_the_entry",)),
    Mutation("class map: a label outside the map accepted", "pld_pipeline/class_map.py",
             "if labels.numel() and (int(labels.min()) < 0", "if False and (int(labels.min()) < 0",
             (CMAP + "test_a_label_outside_the_map_is_refused",)),
    Mutation("class map: top-k tail ignored (mapped masses no longer lower bounds)", "pld_pipeline/class_map.py",
             "tail = torch.zeros_like(log_p[:, 0]) if full else targets.tail_mass().to(dtype)",
             "tail = torch.zeros_like(log_p[:, 0])",
             (CMAP + "test_topk_mapped_mass_is_a_lower_bound_short_by_at_most_the_mapped_tail",)),
    Mutation("class map: group masses summed without a shift (underflow)", "pld_pipeline/class_map.py",
             "shift = hi.gather(1, group)", "shift = torch.zeros_like(log_p)",
             (CMAP + "test_a_teacher_sure_of_an_unmapped_class_still_gives_the_exact_renormalised_mass",)),
    Mutation("class map: a mixed view's own label ranked first, not the dominant one", "pld_pipeline/student_data.py",
             'labels = MixedLabels(batch["label2"].long(), batch["lam"].float()).dominant(labels)', "pass",
             (CMAP + "test_a_mixed_view_batch_ranks_the_dominant_student_label_first",)),
    Mutation("class map: a map file of any size is read", "pld_pipeline/class_map_spec.py",
             "        if size > MAX_MAP_BYTES:", "        if False:",
             (CMAP + "test_a_map_file_larger_than_a_map_needs_is_refused_before_it_is_read",)),
    Mutation("class map: a resume accepts a map file edited since the run started", "pld_pipeline/distill.py",
             "        _check_same_class_map(cfg, data)", "        pass",
             (CMAP + "test_a_resume_refuses_a_map_file_edited_since_the_run_started",)),
    Mutation("class map: distill ignores --class-map", "pld_pipeline/distill.py",
             "expect_digest=cfg.expect_digest, class_map=cfg.class_map)", "expect_digest=cfg.expect_digest)",
             (CMAP + "test_a_mapped_run_trains_and_evaluates_in_the_students_classes",)),
    Mutation("class map: inspect counts mapped mass as out-of-map", "pld_pipeline/class_map.py",
             "unmapped = cmap.student_of(log_p.device)[targets.topk_idx.long()] == cmap.num_classes",
             "unmapped = cmap.student_of(log_p.device)[targets.topk_idx.long()] >= 0",
             (CMAP + "test_inspect_with_a_map_reports_out_of_map_mass_and_student_accuracy",)),
    Mutation("image field: the student reads the default list, not the cache's", "pld_pipeline/student_data.py",
             "        self.image_field = self.recipe.image_field\n", "        self.image_field = \"jpg;jpeg;png;webp\"\n",
             ("tests/test_cache_teacher.py::test_the_image_field_is_recorded_and_the_student_reads_the_image_its_teacher_saw",)),
    Mutation("image field: cache-teacher does not record --image-field", "pld_pipeline/cache_teacher.py",
             "clean_view=cfg.clean_view, image_field=cfg.image_field,", "clean_view=cfg.clean_view,",
             ("tests/test_cache_teacher.py::test_the_image_field_is_recorded_and_the_student_reads_the_image_its_teacher_saw",)),
    Mutation("hostile views: stored boxes replayed unchecked", "pld_pipeline/views.py",
             "    if problem is not None:\n        raise ViewError", "    if False:\n        raise ViewError",
             (CACHE_ATTACK + "test_view_boxes_no_recipe_draws_are_refused_before_replaying",)),
    Mutation("hostile views: the padding allowance doubled", "pld_pipeline/views.py",
             "if not all(min(-pad, (side - size) // 2) <= at", "if not all(min(-2 * pad, (side - size) // 2) <= at",
             (CACHE_ATTACK + "test_view_boxes_no_recipe_draws_are_refused_before_replaying",)),
    Mutation("hostile views: mixing lambda unchecked", "pld_pipeline/views.py",
             "or not 0 <= int(params[12]) <= LAMBDA_ONE:", ":",
             (MIX + "test_replay_is_integer_exact_mixup_and_cutmix",)),
    Mutation("hostile views: CutMix box unchecked", "pld_pipeline/views.py",
             "top + h > recipe.size or left + w > recipe.size:", "top > recipe.size:",
             (MIX + "test_replay_is_integer_exact_mixup_and_cutmix",)),
    Mutation("hostile recipe: view size unbounded", "pld_pipeline/cache/bounds.py",
             '    _int_in(url, "recipe size", parsed.size, 1, MAX_VIEW_SIZE)\n', "",
             (CACHE_ATTACK + "test_sizes_in_the_metadata_are_checked_before_anything_is_allocated",)),
    Mutation("hostile recipe: not parsed at open", "pld_pipeline/cache/bounds.py",
             "    check_recipe(meta.recipe, url)\n", "",
             (CACHE_ATTACK + "test_sizes_in_the_metadata_are_checked_before_anything_is_allocated",)),
    Mutation("local cache: links out of the cache followed", "pld_pipeline/cache/store.py",
             "if stat.S_ISLNK(info.st_mode) or not os.path.realpath(path).startswith(self._real_root + os.sep):",
             "if stat.S_ISLNK(info.st_mode):",
             (CACHE_ATTACK + "test_a_local_cache_is_read_only_from_its_own_regular_files_within_their_sizes",)),
    Mutation("local cache: object sizes unchecked", "pld_pipeline/cache/store.py",
             "        if info.st_size > cap:\n", "        if False:\n",
             (CACHE_ATTACK + "test_a_local_cache_is_read_only_from_its_own_regular_files_within_their_sizes",)),
    Mutation("local cache: opened with zarr's plain LocalStore", "pld_pipeline/cache/store.py",
             "                where = _local_objects(url, read_only=mode == \"r\")", "                where = url",
             (CACHE_ATTACK + "test_a_local_cache_is_read_only_from_its_own_regular_files_within_their_sizes",)),
    Mutation("run folders: file sizes unchecked before reading", "pld_pipeline/files.py",
             "        if info.st_size > limit:\n", "        if False:\n",
             (HOSTILE + "test_report_checks_a_files_size_and_kind_before_reading_it",)),
    Mutation("object stores: whole objects fetched unbounded", "pld_pipeline/cache/store.py",
             "            request: Any = RangeByteRequest(start, start + cap + 1)", "            request = byte_range",
             ("tests/test_sharing.py::test_objects_on_s3_larger_than_their_layout_are_refused_without_being_fetched",)),
    Mutation("object stores: --cache-dir downloads before sizing", "pld_pipeline/cache/store.py",
             "                if remote is not None and remote > cap:", "                if False:",
             ("tests/test_sharing.py::test_objects_on_s3_larger_than_their_layout_are_refused_without_being_fetched",)),
    Mutation("resume: the saved schedule is trusted", "pld_pipeline/distill.py",
             "    if state[\"scheduler\"] != scheduler.state_dict():", "    if False:",
             (HOSTILE + "test_an_edited_resume_state_is_refused_in_one_line",)),
    Mutation("values: a repeated top-k class is read", "pld_pipeline/cache/values.py",
             '(lambda: (np.diff(np.sort(idx, axis=-1), axis=-1) == 0).any(-1), "a repeated class',
             '(lambda: np.zeros(lab.shape, bool), "a repeated class',
             (CACHE_ATTACK + "test_values_no_honest_writer_stores_are_refused_where_they_are_read",)),
    Mutation("values: samples unit read unchecked", "pld_pipeline/cache/cache.py",
             "        if problems:  # what no honest writer stores, whatever its checksums say\n            raise DamagedUnit(self.url, unit.name",
             "        if False:\n            raise DamagedUnit(self.url, unit.name",
             (CACHE_ATTACK + "test_samples_marked_as_padding_never_silently_leave_training",)),
    Mutation("verify: marker counts not recounted", "pld_pipeline/cache/check.py",
             "            if recorded != (found.correct, found.count):", "            if False:",
             (CACHE_ATTACK + "test_a_marker_s_unsigned_counts_are_recounted_by_verify_and_bounded_by_inspect",)),
    Mutation("early refusals: distill's cheap checks skipped (refused only after importing torch)", "cli/app.py",
             "    options.check_distill(data=data,", "    (lambda **_: None)(data=data,",
             (EARLY + "test_distill_mistakes_are_refused_before_torch_is_imported",)),
    Mutation("early refusals: a renamed copy of a cached shard refused", "pld_pipeline/options.py",
             "            found = quick_hash(f) in hashes", "            found = False",
             (EARLY + "test_a_renamed_copy_of_a_cached_shard_passes_the_early_check",)),
    Mutation("optional packages: halving without Optuna found out after the sweep folder is written", "pld_pipeline/sweep.py",
             '        require_module("optuna", "--scheduler halving", "halving")', "        pass",
             (SWEEP + "test_a_missing_optional_package_is_named_with_its_extra_before_anything_is_written",)),
    Mutation("optional packages: --launcher ray without Ray found out after the sweep folder is written",
             "pld_pipeline/launch.py", '            require_module("ray", "--launcher ray", "ray")', "            pass",
             (SWEEP + "test_a_missing_optional_package_is_named_with_its_extra_before_anything_is_written",)),
    Mutation("unclear errors: a checkpoint of another depth reported as torch's full key list", "pld_pipeline/models.py",
             "        misfit = _misfit(model.state_dict(), state)", "        misfit = None",
             ("tests/test_models.py::test_a_checkpoint_of_another_depth_is_summed_up_in_one_short_line",
              "tests/test_models.py::test_num_classes_against_a_checkpoint_of_other_width_names_both_counts")),
    Mutation("unclear errors: no did-you-mean for an unknown model", "pld_pipeline/models.py",
             'raise ValueError(f"Unknown model {source!r}{_did_you_mean(source)}: not',
             'raise ValueError(f"Unknown model {source!r}: not',
             ("tests/test_models.py::test_an_unknown_model_name_suggests_the_closest_ones",)),
    Mutation("unclear errors: an unquoted brace pattern left to click's 'unexpected extra argument'", "cli/app.py",
             "    hint = shell_expanded_pattern(sys.argv[1:])", "    hint = None",
             (EARLY + "test_an_unquoted_brace_pattern_expanded_by_the_shell_says_quote_it",)),
    Mutation("unclear errors: a missing shard is a bare [Errno 2] in the library", "pld_pipeline/data.py",
             '    except FileNotFoundError:\n        raise DataError(f"Shard {url} does not exist; check the --data pattern.") from None',
             '    except KeyError:\n        raise DataError(f"Shard {url} does not exist; check the --data pattern.") from None',
             (EARLY + "test_a_missing_shard_given_to_the_library_is_a_one_line_data_error",)),
    Mutation("progress: the distill bar counts step events, not batches (ETA 10x long)", "cli/progress.py",
             'self.progress.update(self.task, completed=e["step"] + 1,', 'self.progress.update(self.task, advance=1,',
             ("tests/test_progress.py::test_the_distill_bar_counts_batches_not_progress_events",)),
    Mutation("inspect: teacher ids cut to fit an 80-column terminal", "cli/app.py",
             "    if _natural_width(tt) <= out.width or not out.is_terminal:", "    if True:",
             ("tests/test_progress.py::test_inspect_never_cuts_the_digest_or_a_teacher_id_in_an_80_column_terminal",)),
    Mutation("Ctrl-C: distill exits without saying what was kept or how to resume", "cli/app.py",
             "        reporter.distill_interrupted(out_)", "        pass",
             ("tests/test_progress.py::test_ctrl_c_in_distill_says_what_was_kept_and_to_rerun_with_resume",)),
    Mutation("Ctrl-C: cache-teacher counts only this run's shards as kept", "cli/progress.py",
             "        kept = self.skipped_shards + self.shards", "        kept = self.skipped_shards",
             ("tests/test_progress.py::test_ctrl_c_in_cache_teacher_says_what_was_kept_and_to_rerun_the_same_command",)),
    Mutation("plots and tables: flags shown with a <bool> type in --help", "cli/app.py",
             '                param.metavar = ""', "                pass",
             ("tests/test_cli.py::test_flags_show_no_type_in_help",)),
    Mutation("plots and tables: Python None printed for a setting a run leaves unset", "cli/app.py",
             '*["-" if r[k] is None else escape(str(r[k])) for k in keys]', "*[escape(str(r[k])) for k in keys]",
             (SWEEP + "test_the_report_table_reads_right",)),
    Mutation("plots and tables: a run stopped by halving named the sweep's best", "pld_pipeline/sweep.py",
             'finished = [r for r in rows if r["done"] and not r["stopped_after_epochs"] and',
             'finished = [r for r in rows if r["done"] and',
             (SWEEP + "test_the_report_table_reads_right",)),
    Mutation("plots and tables: the sweep plot's y-axis starts near the lowest bar", "pld_pipeline/sweep.py",
             "    ax.set_ylim(0, min(100,", "    ax.set_ylim(max(0, min(means) - 5), min(100,",
             (SWEEP + "test_the_sweep_plot_starts_at_zero_and_marks_runs_stopped_by_halving",)),
    Mutation("plots and tables: verify --audit ends without a verdict when it passes", "cli/app.py",
             '            out.print(f"audit passed: all', '            (lambda *a, **k: None)(f"audit passed: all',
             ("tests/test_audit.py::test_cli_audit_table_json_and_exit_codes",)),
    Mutation("sweep progress: the runs' epochs are not watched (silent until each run ends)", "pld_pipeline/sweep.py",
             "    with SweepWatch(out, todo, emit):", "    with SweepWatch(out, {}, emit):",
             (SWEEP + "test_a_sweep_reports_every_epoch_of_every_run_off_a_terminal",)),
    Mutation("unclear errors: an unreachable hub is retried instead of refused at once", "pld_pipeline/models.py",
             "            _fail_fast_without_hub(source)", "            pass",
             ("tests/test_hub.py::test_an_unreachable_hub_without_hf_hub_offline_fails_fast_naming_the_switch",)),
    Mutation("plots and tables: --help keeps the docstring's line breaks (sentences cut mid-line)", "cli/app.py",
             "        if self.help:", "        if False:",
             ("tests/test_cli.py::test_command_help_reflows_its_paragraphs_to_the_terminal",)),
    Mutation("early refusals: a mistyped loss in a sweep grid found after sweep.json is written", "cli/app.py",
             "        options.check_loss_name(loss)  # before sweep.json", "        pass  # before sweep.json",
             (SWEEP + "test_a_mistyped_loss_in_a_sweep_grid_is_refused_before_the_sweep_folder_is_written",)),
    Mutation("plots and tables: the demo plot zooms on nothing (its right panel the full run, the gap hidden)", "pld_pipeline/demo.py",
             "        tail = slice(len(epochs) - max(2, len(epochs) // 3), None)", "        tail = slice(None)",
             ("tests/test_cli.py::test_the_demo_plot_zooms_on_the_last_epochs_where_the_losses_differ",)),
]


def private_copy() -> Path:
    """The tree's files in a temporary folder, importable ahead of the editable install (PYTHONPATH), so a
    mutation applied there reaches in-process tests and the CLI subprocesses they start."""
    dest = Path(tempfile.mkdtemp(prefix="pld-mutations-"))
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "pld_pipeline_cli").symlink_to("cli", target_is_directory=True)  # the CLI's installed name
    return dest


def run(m: Mutation, timeout: int, root: Path) -> dict:
    path = root / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return {"name": m.name, "outcome": f"snippet found {original.count(m.old)} times (update the mutation)"}
    path.write_text(original.replace(m.old, m.new))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                              cwd=root, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
        outcome = "killed" if proc.returncode != 0 else "ALIVE"
    except subprocess.TimeoutExpired:
        outcome = "killed (timeout)"
    finally:
        path.write_text(original)
    return {"name": m.name, "file": m.file, "outcome": outcome, "seconds": round(time.time() - t0, 1),
            "tests": list(m.tests)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run the mutations whose name contains this text")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    results = []
    root = private_copy()
    print("| mutation | outcome | s |\n|---|---|---|")
    try:
        for m in MUTATIONS:
            if args.only and args.only not in m.name:
                continue
            r = run(m, args.timeout, root)
            results.append(r)
            print(f"| {r['name']} | {r['outcome']} | {r.get('seconds', '')} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return int(any(r["outcome"] != "killed" and not r["outcome"].startswith("killed") for r in results))


if __name__ == "__main__":
    sys.exit(main())
