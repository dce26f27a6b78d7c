"""Where the detectron2 oracle lives: `HASSOD_D2_FIXTURE`, else `../shared/fixtures/
d2_hassod_cascade` beside the repository. Read in place, never copied. Absent: the tests that
need it skip with a message naming what is missing, except under CI (CI=true), where a
missing fixture is a failure."""

import os

import numpy as np
import pytest

ENV = "HASSOD_D2_FIXTURE"
_DEFAULT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "fixtures",
    "d2_hassod_cascade",
)


def fixture_path(*files: str) -> str:
    """The fixture directory holding `files`, or skip (fail under CI) naming what is missing."""
    root = os.path.abspath(os.environ.get(ENV) or _DEFAULT)
    missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
    if missing:
        msg = (
            f"detectron2 fixture {root} lacks {missing}: set {ENV} to the d2_hassod_cascade "
            "folder"
        )
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def load_npz(name: str):
    return np.load(os.path.join(fixture_path(name), name))


def greedy_match(boxes_a, scores_a, boxes_b, iou_threshold):
    """Matches detections A (by descending score) to B one-to-one by IoU, greedily:
    returns (index into B or -1) for each A and the IoUs."""
    from hassod_jax import ops

    iou = np.asarray(ops.box_iou(np.asarray(boxes_a), np.asarray(boxes_b)), np.float64)
    order = np.argsort(-np.asarray(scores_a), kind="stable")
    taken = np.zeros(len(boxes_b), bool)
    match = np.full(len(boxes_a), -1)
    best = np.zeros(len(boxes_a))
    for i in order:
        cand = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(cand)) if len(cand) else -1
        if j >= 0 and cand[j] > iou_threshold:
            match[i], best[i], taken[j] = j, cand[j], True
    return match, best
