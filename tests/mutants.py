"""Mutation check of the test suite: do the tests catch the bugs they are named after?

Run by hand (not collected by pytest, not run by CI):

    python tests/mutants.py                      # every mutant
    python tests/mutants.py hac_cut_strict ...   # some of them
    python tests/mutants.py --list               # names, edits and test ids
    python tests/mutants.py --no-baseline        # skip the run of the unmodified copy

A mutant is a plausible bug written as data: one or more textual search/replace edits (each
search string must occur exactly once in its file, else the script stops) and the pytest ids
that should catch it. For each mutant the working tree (without .git and caches) is copied to a
scratch folder, the edits are applied there, and the ids run in that copy: the current
directory and PYTHONPATH are the copy, and since the package is also installed editable, the
runner checks in the test process itself that `hassod_jax` and every `hassod_jax.*` module it
loaded come from the copy. The mutant is caught when at least one test fails or errors.
First, unless --no-baseline, the union of all the ids runs on an unmodified copy: a test that
fails there would make every mutant look caught, so the script stops on one.

To add a mutant, append a `Mutant(...)` to MUTANTS; nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Edit(NamedTuple):
    path: str  # relative to the repository root
    search: str  # must occur exactly once in the file
    replace: str


class Mutant(NamedTuple):
    name: str
    description: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest ids, relative to the repository root


_MT_CHECK = ("tests/train/test_mt_learning.py::"
             "test_mean_teacher_recovers_the_instances_the_labels_miss")

MUTANTS = [
    Mutant(
        "hac_cut_strict",
        "HAC cut keeps merges with similarity > θ instead of >= θ",
        (
            Edit(
                "hassod_jax/discovery/hac.py",
                "run_min[None, :] >= thresholds[:, None]",
                "run_min[None, :] > thresholds[:, None]",
            ),
        ),
        ("tests/discovery/test_hac.py",),
    ),
    Mutant(
        "crf_one_iteration_fewer",
        "dense CRF runs one mean-field iteration fewer than asked",
        (
            Edit(
                "hassod_jax/discovery/crf.py",
                "q = jax.lax.fori_loop(0, iterations, step, q)",
                "q = jax.lax.fori_loop(0, iterations - 1, step, q)",
            ),
        ),
        (
            "tests/discovery/test_crf.py",
            "tests/discovery/test_lattice.py",
            "tests/discovery/test_pipeline.py::"
            "test_jax_crf_backend_batches_pairs_and_agrees_with_pydensecrf",
        ),
    ),
    Mutant(
        "sweep_first_threshold_masks",
        "the sweep scores every threshold with the first threshold's masks",
        (
            Edit(
                "hassod_jax/discovery/sweep.py",
                'score(lambda res, t=t: res["per_threshold"][t])',
                'score(lambda res, t=t: res["per_threshold"][0])',
            ),
        ),
        (
            "tests/discovery/test_pipeline.py::test_sweep_reports_statistics_and_ar_per_threshold",
            "tests/discovery/test_pipeline_errors.py::"
            "test_multi_job_sweep_merges_to_the_single_job_sweep",
            "tests/test_demo.py",
        ),
    ),
    Mutant(
        "cascade_no_grad_scaling_sigmoid_scores",
        "the cascade without its 1/3 gradient scaling AND sigmoid instead of softmax scores",
        (
            Edit(
                "hassod_jax/models/detector.py",
                "self._pool(feats, boxes, cfg.box_pooler_resolution), 1.0 / cfg.num_stages",
                "self._pool(feats, boxes, cfg.box_pooler_resolution), 1.0",
            ),
            Edit(
                "hassod_jax/models/detector.py",
                "score_sum = score_sum + jax.nn.softmax(cls, axis=-1)[..., 0]",
                "score_sum = score_sum + jax.nn.sigmoid(cls[..., 0])",
            ),
        ),
        (
            "tests/models/test_d2_parity.py",
            "tests/models/test_d2_train_step.py",
            "tests/models/test_detector.py",
        ),
    ),
    Mutant(
        "cascade_no_grad_scaling",
        "the cascade without its 1/3 gradient scaling (training only)",
        (
            Edit(
                "hassod_jax/models/detector.py",
                "self._pool(feats, boxes, cfg.box_pooler_resolution), 1.0 / cfg.num_stages",
                "self._pool(feats, boxes, cfg.box_pooler_resolution), 1.0",
            ),
        ),
        ("tests/models/test_d2_train_step.py",),
    ),
    Mutant(
        "levels_sigmoid_average",
        "test-time level probabilities averaged as sigmoids (our old rule) instead of softmaxes",
        (
            Edit(
                "hassod_jax/models/detector.py",
                "level_sum = level_sum + jax.nn.softmax(lvl, axis=-1)",
                "level_sum = level_sum + jax.nn.sigmoid(lvl)",
            ),
        ),
        ("tests/models/test_d2_parity.py",),
    ),
    Mutant(
        "roi_align_per_axis_cap_8",
        "adaptive ROIAlign capped at 8 samples per axis (the old rule; thin boxes approximated)",
        (
            Edit(
                "hassod_jax/ops/roi_align.py",
                "gh, gw = _fit_to_cap(gh, gw, int(max_sampling))",
                "gh, gw = jnp.minimum(gh, 8), jnp.minimum(gw, 8)",
            ),
        ),
        ("tests/models/test_d2_parity.py", "tests/ops/test_roi_align.py"),
    ),
    Mutant(
        "droploss_all_gt",
        "DropLoss against every pseudo-label box instead of the original's reference set",
        (
            Edit(
                "hassod_jax/models/detector.py",
                'droploss_reference: str = "original"',
                'droploss_reference: str = "all_gt"',
            ),
        ),
        ("tests/models/test_d2_train_step.py",),
    ),
    Mutant(
        "mask_targets_transposed",
        "the mask head trained against transposed ground-truth masks (rows and columns swapped)",
        (
            Edit(
                "hassod_jax/models/detector.py",
                "            gt_masks, mboxes, mmatched\n        )",
                "            jnp.swapaxes(gt_masks, -1, -2), mboxes, mmatched\n        )",
            ),
        ),
        ("tests/train/test_mt_learning.py::"
         "test_small_detector_learns_generated_scenes_from_incomplete_labels",
         "tests/models/test_d2_train_step.py"),
    ),
    # Mean Teacher and stage 2, each against an independent statement of the original
    # (tests/train/test_mt_recipe.py, tests/train/test_schedules.py).
    Mutant(
        "mt_config_ema_keep",
        "configs/mean_teacher_coco.py's EMA keep rate 0.999 instead of the original's 0.9996",
        (Edit("hassod_jax/defaults.py", "c.ema_keep = 0.9996", "c.ema_keep = 0.999"),),
        ("tests/train/test_mt_recipe.py::test_mean_teacher_config_is_the_originals",),
    ),
    Mutant(
        "mt_config_targets_capped",
        "the Mean Teacher config caps the teacher's targets at 100 per image",
        (Edit("hassod_jax/defaults.py", "    c.max_targets = -1\n", "    c.max_targets = 100\n"),),
        ("tests/train/test_mt_recipe.py::test_mean_teacher_config_is_the_originals",),
    ),
    Mutant(
        "targets_capped_at_100",
        "teacher_targets keeps at most 100 targets when no cap is asked for",
        (Edit("hassod_jax/train/mean_teacher.py",
              "t = d if max_targets is None or int(max_targets) < 0 else",
              "t = min(d, 100) if max_targets is None or int(max_targets) < 0 else"),),
        ("tests/train/test_mt_recipe.py::"
         "test_every_detection_above_the_threshold_is_a_target_by_default",),
    ),
    Mutant(
        "ema_float32_one_minus_keep",
        "the EMA's student weight computed as float32(1) - float32(keep)",
        (Edit("hassod_jax/train/mean_teacher.py", "rest = np.float32(1.0 - float(keep))",
              "rest = np.float32(1.0) - k"),),
        ("tests/train/test_mt_recipe.py::"
         "test_one_ema_step_is_the_originals_float32_arithmetic_bit_for_bit",),
    ),
    Mutant(
        "ema_fused_multiply_add",
        "the EMA written plainly, so XLA fuses a product into a multiply-add",
        (Edit("hassod_jax/train/mean_teacher.py", "ema = rounded(t32 * k) + rounded(s32 * rest)",
              "ema = t32 * k + s32 * rest"),),
        ("tests/train/test_mt_recipe.py::"
         "test_one_ema_step_is_the_originals_float32_arithmetic_bit_for_bit",),
    ),
    Mutant(
        "ema_params_only",
        "the EMA moves the parameters only; the teacher's statistics are the student's",
        (Edit("hassod_jax/train/mean_teacher.py",
              '{"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}',
              '{"params": state.teacher_params, "batch_stats": state.batch_stats}'),),
        ("tests/train/test_mt_recipe.py::"
         "test_teacher_ema_moves_parameters_and_batch_statistics",),
    ),
    Mutant(
        "teacher_sees_strong_views",
        "the teacher runs on the strong unlabel views",
        (Edit("hassod_jax/train/mean_teacher.py", 'weak_u = _images(unlabel, "images")',
              'weak_u = _images(unlabel, "images_strong")'),),
        ("tests/train/test_mt_recipe.py::test_teacher_reads_the_weak_views_only",),
    ),
    Mutant(
        "teacher_eval_mode",
        "the teacher runs in eval mode (running statistics, the RPN's test top-k)",
        (Edit("hassod_jax/train/mean_teacher.py", "teacher, weak_u, train=True, losses=False",
              "teacher, weak_u, train=False, losses=False"),),
        ("tests/train/test_mt_recipe.py::"
         "test_teacher_is_training_bn_and_rpn_with_the_test_roi_path",),
    ),
    Mutant(
        "teacher_rpn_test_topk",
        "the RPN's top-k follows `losses` instead of `train` (the teacher gets the test top-k)",
        (Edit("hassod_jax/models/detector.py",
              "self._proposals(feats, image_sizes, train)\n        if proposals",
              "self._proposals(feats, image_sizes, losses)\n        if proposals"),),
        ("tests/train/test_mt_recipe.py::"
         "test_teacher_is_training_bn_and_rpn_with_the_test_roi_path",),
    ),
    Mutant(
        "teacher_levels_at_09",
        "the teacher's levels recomputed at stage 1's coverage 0.9",
        (Edit("hassod_jax/train/mean_teacher.py",
              "levels, _ = hierarchy_levels_padded(masks, valid, coverage)",
              "levels, _ = hierarchy_levels_padded(masks, valid, 0.9)"),),
        ("tests/train/test_mt_recipe.py::test_levels_are_recomputed_at_coverage_075",),
    ),
    Mutant(
        "unsup_mask_loss_trained",
        "the unlabeled branch's mask loss is trained (weighted w_unsup)",
        (Edit("hassod_jax/train/mean_teacher.py",
              'v for k, v in unsup.items() if k != "mask"', "v for k, v in unsup.items()"),),
        ("tests/train/test_mt_recipe.py::test_student_total_loss_and_batch_statistics",),
    ),
    Mutant(
        "student_stats_skip_unlabel_forward",
        "the student keeps the statistics of its supervised forward only",
        (Edit("hassod_jax/train/mean_teacher.py",
              'return total, (sup, unsup, v2["batch_stats"])',
              'return total, (sup, unsup, v1["batch_stats"])'),),
        ("tests/train/test_mt_recipe.py::test_student_total_loss_and_batch_statistics",),
    ),
    Mutant(
        "student_sup_weak_views_only",
        "the supervised branch sees the weak label views twice instead of strong + weak",
        (Edit("hassod_jax/train/mean_teacher.py",
              '_pairs(_images(label, "images_strong"), _images(label, "images"))',
              '_pairs(_images(label, "images"), _images(label, "images"))'),),
        ("tests/train/test_mt_recipe.py::test_student_total_loss_and_batch_statistics",),
    ),
    Mutant(
        "streams_same_seed",
        "the label and unlabel streams share one seed (the same batches)",
        (Edit("hassod_jax/modes/mean_teacher.py",
              '("unlabel", config.batch_size_unlabel, config.seed + 1)',
              '("unlabel", config.batch_size_unlabel, config.seed)'),),
        ("tests/train/test_mt_recipe.py::"
         "test_streams_are_independent_and_each_resumes_exactly",),
    ),
    Mutant(
        "strong_view_same_every_step",
        "the strong view's random draws do not depend on the step",
        (Edit("hassod_jax/data/loader.py",
              "np.random.default_rng([cfg.seed, _STRONG_TAG, k, lo + i])",
              "np.random.default_rng([cfg.seed, _STRONG_TAG, lo + i])"),),
        ("tests/train/test_mt_recipe.py::test_strong_views_are_drawn_afresh_every_step",),
    ),
    Mutant(
        "mt_sampler_key_fixed",
        "Mean Teacher's samplers use the same key at every step",
        (Edit("hassod_jax/train/mean_teacher.py", "key = jax.random.fold_in(rng, t)",
              "key = rng"),),
        ("tests/train/test_mt_recipe.py::test_sampler_randomness_changes_from_step_to_step",),
    ),
    Mutant(
        "train_sampler_key_fixed",
        "stage 2's samplers use the same key at every step",
        (Edit("hassod_jax/train/supervised.py", "key = jax.random.fold_in(rng, state.step)",
              "key = rng"),),
        ("tests/train/test_mt_recipe.py::test_sampler_randomness_changes_from_step_to_step",),
    ),
    Mutant(
        "test_resize_uncapped",
        "test-time resizing ignores the long-side cap",
        (Edit("hassod_jax/data/augment.py", "    if max(new_h, new_w) > max_size:",
              "    if False and max(new_h, new_w) > max_size:"),),
        ("tests/train/test_mt_recipe.py::test_test_time_resize_caps_the_long_side",),
    ),
    Mutant(
        "crf_pairs_on_one_device",
        "discovery's device CRF runs every batch of pairs on one device",
        (Edit("hassod_jax/discovery/pipeline.py",
              "            args = jax.device_put((images, probs, valid), pairs_sharding)",
              "            args = (images, probs, valid)"),),
        ("tests/discovery/test_pipeline.py::test_jax_crf_pairs_are_split_over_the_hosts_devices",),
    ),
    Mutant(
        "import_circle_pipeline_sweep",
        "the discovery pipeline imports the sweep again (the circle broken by modes/discovery.py)",
        (Edit("hassod_jax/discovery/pipeline.py",
              "from hassod_jax.utils import threshold_name\n",
              "from hassod_jax.utils import threshold_name\n\n\ndef _sweep():\n"
              "    from hassod_jax.discovery import sweep\n\n    return sweep\n"),),
        ("tests/test_layout.py::test_the_package_has_no_import_circle",),
    ),
    Mutant(
        "mode_help_names_another_config",
        "--help names the wrong config file for mode=train",
        (Edit("hassod_jax/modes/__init__.py", '"configs/train_coco.py"', '"configs/predict.py"'),),
        ("tests/test_main.py::test_each_modes_config_file_sets_that_mode",),
    ),
    Mutant(
        "loop_saves_before_the_job",
        "the shared training loop checkpoints before PreciseBN's recomputation, not after",
        (Edit("hassod_jax/train/loop.py",
              "            if save_now:\n                checkpointer.save(done, state, data_state())\n"
              "                last_good = done\n", ""),
         Edit("hassod_jax/train/loop.py", "            if after_step is not None:\n",
              "            if save_now:\n                checkpointer.save(done, state, data_state())\n"
              "                last_good = done\n            if after_step is not None:\n")),
        ("tests/train/test_loop.py::test_job_then_checkpoint_then_evaluation_at_their_steps",),
    ),
    Mutant(
        "loop_no_final_evaluation",
        "the shared training loop evaluates every eval_every steps but not at the last step",
        (Edit("hassod_jax/train/loop.py", "(done % eval_every == 0 or done == max_iter)",
              "(done % eval_every == 0)"),),
        ("tests/train/test_loop.py::test_job_then_checkpoint_then_evaluation_at_their_steps",),
    ),
    Mutant(
        "loop_last_good_not_updated",
        "the NaN guard names the checkpoint the run started from, not the last one written",
        (Edit("hassod_jax/train/loop.py", "                last_good = done\n", ""),),
        ("tests/train/test_loop.py::"
         "test_a_non_finite_loss_stops_naming_the_last_good_checkpoint",),
    ),
    Mutant(
        "compute_dtype_unchecked",
        "an unknown config.dtype reaches the dtype table (a KeyError traceback, not one line)",
        (Edit("hassod_jax/utils.py", "    if name not in dtypes:\n", "    if False:\n"),),
        ("tests/test_user_errors.py::test_an_unknown_compute_dtype_names_the_field",),
    ),
    Mutant(
        "toy_preset_changes_the_recipe",
        "the toy Mean Teacher preset also changes the recipe's coverage",
        (Edit("hassod_jax/defaults.py", "    c.max_targets = 8\n",
              "    c.max_targets = 8\n    c.coverage = 0.9\n"),),
        ("tests/test_main.py::test_toy_preset_changes_the_scale_only",),
    ),
    # The learning check (each runs the whole check: about 10 minutes of one core).
    Mutant(
        "mt_check_targets_dropped",
        "the teacher's targets are all marked invalid (no unlabeled supervision but background)",
        (Edit("hassod_jax/train/mean_teacher.py", '        "valid": valid,\n        "num_kept"',
              '        "valid": valid & False,\n        "num_kept"'),),
        (_MT_CHECK,),
    ),
    Mutant(
        "mt_check_w_unsup_zero",
        "the unlabeled branch weighted 0 at every step",
        (Edit("hassod_jax/train/mean_teacher.py",
              "        if not use_unsup:\n            w_unsup = jnp.zeros_like(w_unsup)",
              "        if True:\n            w_unsup = jnp.zeros_like(w_unsup)"),),
        (_MT_CHECK,),
    ),
    Mutant(
        "mt_check_ema_frozen",
        "the teacher never moves from the start (the EMA keeps the old teacher)",
        (Edit("hassod_jax/train/mean_teacher.py",
              "return jnp.where(step == 0, s32, ema).astype(t.dtype)",
              "return jnp.where(step == 0, s32, t32).astype(t.dtype)"),),
        (_MT_CHECK,),
    ),
    Mutant(
        "mt_check_ema_copy",
        "the teacher is a copy of the student at every step",
        (Edit("hassod_jax/train/mean_teacher.py",
              "return jnp.where(step == 0, s32, ema).astype(t.dtype)",
              "return jnp.where(step == 0, s32, s32).astype(t.dtype)"),),
        (_MT_CHECK,),
    ),
    Mutant(
        "mt_check_teacher_strong",
        "the teacher makes its targets on the strong views",
        (Edit("hassod_jax/train/mean_teacher.py", 'weak_u = _images(unlabel, "images")',
              'weak_u = _images(unlabel, "images_strong")'),),
        (_MT_CHECK,),
    ),
    Mutant(
        "cosine_in_float32",
        "the cosine schedule evaluated in float32 (1 + cos cancels near the end)",
        (Edit("hassod_jax/train/schedules.py",
              "frac = np.clip(t / max(max_iter, 1), 0.0, 1.0)",
              "frac = np.clip(t / max(max_iter, 1), 0.0, 1.0).astype(np.float32)\n"
              "        return (end_lr + 0.5 * (base_lr - end_lr) * (np.float32(1.0) + "
              "np.cos(np.float32(math.pi) * frac))).astype(np.float32)"),),
        ("tests/train/test_schedules.py",),
    ),
    Mutant(
        "loss_weights_in_float32",
        "the adaptive loss weights evaluated in float32",
        (Edit("hassod_jax/train/schedules.py",
              "t = np.arange(int(total_steps) + 1, dtype=np.float64)",
              "t = np.arange(int(total_steps) + 1, dtype=np.float32)"),),
        ("tests/train/test_schedules.py",),
    ),
    Mutant(
        "prepare_gt_odd_part_drops_object",
        "prepare_gt drops the whole object for one polygon part with an odd coordinate count",
        (Edit("hassod_jax/data/prepare_gt.py",
              "            if why:\n                dropped[why] = dropped.get(why, 0) + 1",
              "            if why == POLYGON_PARTS_ODD:\n                return None, (why, ''), {}\n"
              "            if why:\n                dropped[why] = dropped.get(why, 0) + 1"),),
        ("tests/data/test_prepare_gt.py::"
         "test_polygon_part_with_an_odd_number_of_coordinates_is_dropped_alone",),
    ),
    Mutant(
        "prepare_gt_strict_stops_at_parts",
        "strict prepare_gt stops at a dropped polygon part, which normal mode keeps going past",
        (Edit("hassod_jax/data/prepare_gt.py",
              "        self.counts[reason] = self.counts.get(reason, 0) + n",
              "        if self.strict:\n            self(source, record, reason)\n"
              "        self.counts[reason] = self.counts.get(reason, 0) + n"),),
        ("tests/data/test_prepare_gt.py::"
         "test_strict_keeps_an_object_whose_short_part_normal_mode_drops",),
    ),
    Mutant(
        "lvis_file_name_last",
        "LVIS file names default to the URL's last part (no split folder)",
        (Edit("hassod_jax/defaults.py", 'c.lvis_file_name = "split"',
              'c.lvis_file_name = "last"'),),
        ("tests/data/test_prepare_gt.py::"
         "test_lvis_default_file_names_resolve_in_the_documented_layout",),
    ),
    Mutant(
        "cutler_merge_against_coco_only",
        "the CutLER merge compares an LVIS mask with COCO's only, not with the LVIS ones kept",
        (Edit("hassod_jax/data/prepare_gt.py",
              "worst = max([*iou_lc[i], *iou_ll[i, kept]], default=0.0)",
              "worst = max([*iou_lc[i]], default=0.0)"),),
        ("tests/data/test_prepare_gt.py::"
         "test_coco_lvis_cutler_merge_rule_and_both_counts_in_the_summary",),
    ),
    Mutant(
        "evaluate_unknown_images_a_bug",
        "predictions on images the ground truth lacks raise a plain ValueError (a traceback)",
        (Edit("hassod_jax/evaluate/coco_eval.py",
              '        raise utils.InputError(\n            f"{len(unknown)} prediction image id(s)',
              '        raise ValueError(\n            f"{len(unknown)} prediction image id(s)'),),
        ("tests/test_user_errors.py::test_evaluate_predictions_on_images_the_ground_truth_lacks",),
    ),
    Mutant(
        "orbax_read_state_item_alone",
        "a checkpoint step read through its 'state' folder, where orbax finds no metadata",
        (Edit("hassod_jax/weights/detectron2.py",
              "            meta = ckptr.metadata(path).item_metadata[\"state\"]",
              "            meta = ckptr.metadata(os.path.join(path, 'state')).item_metadata"),),
        ("tests/weights/test_orbax_read.py",),
    ),
    Mutant(
        "vit_whole_batch_on_cpu",
        "the ViT on CPU takes the whole (padded) batch in one call",
        (Edit("hassod_jax/discovery/pipeline.py",
              'self.group = jax.local_device_count() if jax.default_backend() == "cpu" else 0',
              "self.group = 0"),),
        ("tests/discovery/test_memory.py::"
         "test_vit_on_cpu_sees_a_device_group_per_call_and_no_padding",),
    ),
    Mutant(
        "discovery_pads_on_cpu",
        "the last feature batch is padded on CPU too",
        (Edit("hassod_jax/discovery/pipeline.py", "pad = 0 if host else bs - len(batch)",
              "pad = bs - len(batch)"),),
        ("tests/discovery/test_memory.py::"
         "test_vit_on_cpu_sees_a_device_group_per_call_and_no_padding",),
    ),
    Mutant(
        "sweep_refine_ignored",
        "refine=False still runs the CRF (the field read nowhere)",
        (Edit("hassod_jax/discovery/pipeline.py", '"refine": refine_on,', '"refine": True,'),),
        ("tests/discovery/test_sweep_quick.py",),
    ),
    Mutant(
        "resume_record_without_refine",
        "a resume record written before the refine field is taken as another setting",
        (Edit("hassod_jax/discovery/pipeline.py", '_RECORDED_DEFAULTS = {"refine": True}',
              "_RECORDED_DEFAULTS = {}"),),
        ("tests/discovery/test_sweep_quick.py::"
         "test_a_workdir_is_not_resumed_with_the_other_refine",),
    ),
    Mutant(
        "one_tpu_host_starts_distributed",
        "TPU_WORKER_HOSTNAMES naming one host is taken for a multi-process launch",
        (Edit("hassod_jax/parallel.py", "return len(hosts) > 1", "return len(hosts) > 0"),),
        ("tests/test_main.py::test_one_tpu_host_is_a_single_process_run",),
    ),
    Mutant(
        "checkpoint_model_config_not_saved",
        "training checkpoints do not store the run's DetectorConfig",
        (Edit("hassod_jax/train/checkpoint.py", "        if self.model is not None:\n",
              "        if False:\n"),),
        ("tests/weights/test_detectron2.py::test_our_checkpoint_keeps_the_runs_model_config",),
    ),
    Mutant(
        "load_detector_ignores_saved_config",
        "load_detector infers the config from the shapes although the checkpoint stores it",
        (Edit("hassod_jax/weights/detectron2.py",
              "stored = _read_orbax_model(step_dir) if saved_config else None", "stored = None"),),
        ("tests/weights/test_detectron2.py::test_our_checkpoint_keeps_the_runs_model_config",),
    ),
    Mutant(
        "supervised_stores_no_model_config",
        "the supervised trainer's checkpoints carry no model config",
        (Edit("hassod_jax/modes/train.py",
              "workdir, state, replicated, config.keep_checkpoints, model.config",
              "workdir, state, replicated, config.keep_checkpoints"),),
        ("tests/test_predict_mode.py::test_predict_mode_end_to_end",),
    ),
    Mutant(
        "mean_teacher_reads_stage2_config",
        "Mean Teacher builds its model from the stage-2.2 run's stored config",
        (Edit("hassod_jax/modes/mean_teacher.py", "which=config.init_which, saved_config=False,",
              "which=config.init_which, saved_config=True,"),),
        ("tests/train/test_mt_recipe.py::test_the_model_is_its_own_configs_not_the_stage_2_runs",),
    ),
    Mutant(
        "validation_sizes_swapped",
        "periodic evaluation resizes with val_max_size as the short edge",
        (Edit("hassod_jax/modes/train.py", "short_edge=config.val_short_edge,",
              "short_edge=config.val_max_size,"),),
        ("tests/train/test_loop.py::"
         "test_the_validation_set_and_its_settings_come_from_the_val_fields",),
    ),
    Mutant(
        "sweep_report_drops_ensembles",
        "the sweep's report leaves out the config's ensemble_thresholds",
        (Edit("hassod_jax/modes/discovery.py",
              'ensemble_thresholds=config.get("ensemble_thresholds", ()),',
              "ensemble_thresholds=(),"),),
        ("tests/discovery/test_pipeline.py::"
         "test_sweep_reports_statistics_and_ar_per_threshold",),
    ),
    Mutant(
        "mask_threshold_ignored",
        "post-processing pastes masks at 0.5 whatever mask_threshold says",
        (Edit("hassod_jax/inference/processing.py",
              "det[\"masks\"][keep], boxes, int(oh), int(ow), threshold=mask_threshold",
              "det[\"masks\"][keep], boxes, int(oh), int(ow)"),),
        ("tests/evaluate/test_predict.py::"
         "test_the_mask_threshold_binarises_the_pasted_probabilities",),
    ),
    Mutant(
        "orbax_read_without_model_handler",
        "reading a checkpoint's state knows no handler for its model item (orbax warns)",
        (Edit("hassod_jax/weights/detectron2.py",
              "        model=ocp.JsonCheckpointHandler(),\n    )", "    )"),),
        ("tests/weights/test_orbax_read.py::"
         "test_a_checkpoint_with_the_model_config_reads_and_resumes_without_warnings",),
    ),
]

_IGNORE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "build", "workdir*", ".whl"
)

# Runs inside the scratch copy: checks what is imported, then runs pytest in the same process.
_RUNNER = r"""
import os, sys
root, junit, ids = sys.argv[1], sys.argv[2], sys.argv[3:]
import hassod_jax
want = os.path.realpath(os.path.join(root, "hassod_jax"))
got = os.path.realpath(os.path.dirname(hassod_jax.__file__))
if got != want:
    print(f"mutants: imported hassod_jax from {got}, not from the scratch copy {want}")
    sys.exit(97)


class CheckImports:
    bad = []

    def pytest_sessionfinish(self, session):
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if name.split(".")[0] == "hassod_jax" and path:
                if not os.path.realpath(path).startswith(want + os.sep):
                    self.bad.append(f"{name}: {path}")


import pytest

check = CheckImports()
# -n 0: in this process (the import check looks at this process's modules).
args = ["-q", "-n", "0", "-p", "no:cacheprovider", "--tb=line", "-rfE", f"--junitxml={junit}",
        *ids]
code = pytest.main(args, plugins=[check])
if check.bad:
    print("mutants: modules loaded from outside the scratch copy: " + ", ".join(check.bad))
    sys.exit(97)
sys.exit(int(code))
"""


def copy_tree(dst: str) -> None:
    shutil.copytree(ROOT, dst, ignore=_IGNORE, symlinks=True)


def apply(mutant: Mutant, root: str) -> None:
    for edit in mutant.edits:
        path = os.path.join(root, edit.path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        count = text.count(edit.search)
        if count != 1:
            raise SystemExit(
                f"mutant {mutant.name}: the search string occurs {count} times in {edit.path}, "
                f"not exactly once: {edit.search!r}"
            )
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(edit.search, edit.replace))


def _node_id(case: ET.Element) -> str:
    module = case.get("classname", "")
    parts = module.split(".")
    # classname is module[.Class]; the module is the longest prefix that is a file here.
    for k in range(len(parts), 0, -1):
        path = "/".join(parts[:k]) + ".py"
        if os.path.exists(os.path.join(ROOT, path)):
            return "::".join([path, *parts[k:], case.get("name", "")])
    return f"{module}::{case.get('name', '')}"


def run_tests(root: str, ids, timeout: float) -> dict:
    """Runs pytest ids in `root`; returns counts and the ids that failed or errored."""
    junit = os.path.join(root, ".mutants_junit.xml")
    env = {**os.environ, "PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)  # skips stay skips here: the baseline reports them
    # The scratch copy lacks the detectron2 fixture that d2_fixture.py finds beside the
    # repository: point the tests at it, or the detector tests skip and no mutant of the
    # detector can be caught.
    fixture = os.path.join(ROOT, "..", "shared", "fixtures", "d2_hassod_cascade")
    if os.path.isdir(fixture):
        env.setdefault("HASSOD_D2_FIXTURE", os.path.abspath(fixture))
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", _RUNNER, root, junit, *ids],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 1, 2) or not os.path.exists(junit):
        # 2 is pytest's "interrupted" (e.g. a collection error), which the report shows;
        # anything else (unknown test id; 97: the import check) is a broken run.
        raise SystemExit(
            f"mutants: the test run in {root} failed to run (exit {r.returncode}):\n"
            f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    failed, skipped, total = [], [], 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(_node_id(case))
        elif case.find("skipped") is not None:
            skipped.append(_node_id(case))
    return {"total": total, "failed": failed, "skipped": skipped, "seconds": seconds}


def _table(rows) -> str:
    head = ["mutant", "tests run", "caught", "catching tests"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in rows:
        caught = "yes" if res["failed"] else "NO"
        catching = "<br>".join(res["failed"]) if res["failed"] else "-"
        lines.append(f"| {name} | {res['total']} | {caught} | {catching} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmodified run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; known: {', '.join(by_name)}")
    mutants = [by_name[n] for n in args.names] or MUTANTS
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.description}")
            for e in m.edits:
                print(f"    {e.path}: {e.search!r} -> {e.replace!r}")
            for t in m.tests:
                print(f"    test: {t}")
        return 0

    scratch = tempfile.mkdtemp(prefix="hassod_mutants_")
    try:
        # Every edit must apply before anything runs: each mutant alone on a fresh copy (two
        # mutants may edit the same line).
        for m in mutants:
            probe = os.path.join(scratch, "probe")
            os.makedirs(probe)
            for e in m.edits:
                os.makedirs(os.path.dirname(os.path.join(probe, e.path)), exist_ok=True)
                shutil.copy(os.path.join(ROOT, e.path), os.path.join(probe, e.path))
            apply(m, probe)
            shutil.rmtree(probe)
        if not args.no_baseline:
            ids = list(dict.fromkeys(t for m in mutants for t in m.tests))
            base = os.path.join(scratch, "baseline")
            copy_tree(base)
            res = run_tests(base, ids, args.timeout)
            print(
                f"baseline (unmodified copy): {res['total']} tests, {len(res['failed'])} failed, "
                f"{len(res['skipped'])} skipped, {res['seconds']:.0f} s",
                flush=True,
            )
            if res["skipped"]:
                print("  skipped: " + ", ".join(res["skipped"]), flush=True)
            if res["failed"]:
                print("  failed: " + ", ".join(res["failed"]), flush=True)
                raise SystemExit("mutants: the unmodified copy fails; fix that first")
        rows = []
        for m in mutants:
            root = os.path.join(scratch, m.name)
            copy_tree(root)
            apply(m, root)
            res = run_tests(root, m.tests, args.timeout)
            rows.append((m.name, res))
            print(
                f"{m.name}: {res['total']} tests, {len(res['failed'])} failed, "
                f"{res['seconds']:.0f} s",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"scratch copies kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    for m in mutants:
        print(f"- {m.name}: {m.description}")
    print()
    print(_table(rows))
    return 0 if all(res["failed"] for _, res in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
