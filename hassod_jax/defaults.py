"""Default config trees shared by the files in configs/ (the numbers of docs/recipe.md).

The files in configs/ are thin: they call these and override a few fields, so a variant
never copies the recipe.
"""

import ml_collections
from ml_collections import config_dict


def detector_fields(**values):
    """config.model: a field for each field of the detector's `DetectorConfig`
    (models/detector.py) but the backbone's, so that the command line can set any of them
    (--config.model.rpn_post_nms_topk_train=1000); unset (None) means the model's own value.
    `values` sets some."""
    import dataclasses

    from hassod_jax.models import detector

    base = detector.DetectorConfig()
    m = ml_collections.ConfigDict()
    if "size" in values:
        m.size = values.pop("size")
    for f in dataclasses.fields(detector.DetectorConfig):
        if f.name != "resnet":
            default = getattr(base, f.name)
            m[f.name] = config_dict.placeholder(int if default is None else type(default))
    for k, v in values.items():
        m[k] = v
    return m


def discovery():
    """Stage 1: DINO ViT-B/8 keys -> HAC -> dense CRF -> coverage tree (docs/recipe.md, Stage 1)."""
    c = ml_collections.ConfigDict()
    c.mode = "discover"
    c.images = config_dict.placeholder(str)  # folder of images (required)
    c.coco_json = ""  # optional COCO JSON giving the image list and ids
    c.backbone = "dino"  # 'dino' (needs dino_checkpoint) or 'standin' (no weights; demo only)
    c.dino_checkpoint = config_dict.placeholder(str)
    c.feature_kind = "k"  # k | q | v | kqv (1.1)
    c.dtype = "float32"  # ViT compute dtype: float32 | bfloat16
    c.image_size = 480
    c.thresholds = (0.4, 0.2, 0.1)  # HAC merge thresholds (1.2)
    c.coverage = 0.9  # coverage threshold of the hierarchy tree (1.4)
    c.min_area = 100  # masks with fewer pixels are dropped (1.3 step 5)
    c.crf_backend = "auto"  # auto | jax | pydensecrf (auto: jax on an accelerator, else pydensecrf)
    c.crf = ml_collections.ConfigDict(
        dict(
            sxy_gaussian=3,
            compat_gaussian=7,
            sxy_bilateral=50,
            srgb=5,
            compat_bilateral=10,
            iterations=10,
        )
    )
    c.batch_size = 8  # images per device batch for the ViT and HAC
    c.chunk_size = 64  # images per committed chunk (the resume granularity)
    c.num_workers = -1  # decode/CRF worker processes; -1 = one per CPU core but one; 0 = inline
    c.job_index = 0  # independent jobs: this job's index ...
    c.num_jobs = 1  # ... out of this many (combined with jax.process_index/count)
    c.max_images = -1  # -1 = all
    c.max_pictures = 20  # W/pictures: the pseudo-labels of the first images; 0 = none, -1 = all
    c.panel_per_level = False  # pictures with one panel per level
    c.log_every_s = 30.0
    return c


def sweep():
    """Threshold sweep: every threshold is a cut of ONE merge sequence per image; each is then
    refined (a CRF per image and threshold) unless refine=False."""
    c = discovery()
    c.mode = "sweep"
    c.thresholds = tuple(round(0.05 * i, 2) for i in range(1, 13))  # 0.05 ... 0.6
    c.gt_json = ""  # optional ground truth: class-agnostic mask AR/AP per threshold
    c.ensemble_thresholds = (0.1, 0.2, 0.4)  # the published ensemble, evaluated when in the sweep
    # True: every threshold's regions refined as in discovery, one dense CRF per image and
    # threshold (12 thresholds cost 4x a 3-threshold discovery run). False: the quick curve,
    # statistics and AR/AP of the raw HAC regions (no CRF, no IoU filter).
    c.refine = True
    return c


def evaluation():
    """Class-agnostic COCO evaluation of a prediction file, by the original HASSOD's protocol
    (docs/recipe.md, Evaluation: maxDets 10/100/1000, every AP at 1000)."""
    c = ml_collections.ConfigDict()
    c.mode = "evaluate"
    c.gt_json = config_dict.placeholder(str)  # any COCO-format ground truth
    c.predictions_json = config_dict.placeholder(str)  # a result list, or a COCO dict
    c.output = ""  # default: workdir/eval.json
    c.iou_types = ("bbox", "segm")
    # The original's maxDets. Other values (e.g. 1) add 'extra/AR@m' keys (ours, not the
    # original's); 10, 100 and 1000 are always evaluated.
    c.max_dets = (10, 100, 1000)
    # Ours, not the original's, comma-separated: 'AR@<m>' (recall at m detections per image)
    # and 'levels' (each hier_level's predictions alone); reported under 'extra/' keys.
    c.extras = ""
    # False: predictions on images the ground truth lacks are refused. True: only the ground
    # truth's images are scored; the other predictions are left out and counted in the output.
    c.restrict_to_gt = False
    return c


def training():
    """Stage 2, initial training on pseudo-labels (docs/recipe.md, Stage 2; detectron2 defaults)."""
    c = ml_collections.ConfigDict()
    c.mode = "train"
    c.train_json = config_dict.placeholder(str)  # e.g. W1/pseudo_labels/pseudo_labels_hier.json
    c.images = config_dict.placeholder(str)
    c.resnet_checkpoint = ""  # dino_resnet50_pretrain.pth or the detectron2-format .pkl
    # size r50 | small; every other field of the detector's DetectorConfig can be set here
    # (unset: the size's own value). level_loss_weight 0: the paper's "plain" ablation row.
    c.model = detector_fields(size="r50", use_droploss=True, level_loss_weight=1.0)
    c.dtype = "bfloat16"  # compute dtype; parameters stay float32
    c.batch_size = 16  # global, over all devices and hosts
    c.max_iter = 40000
    c.base_lr = 0.01
    # The original's own numbers (cascade yaml: SOLVER.STEPS (80000,), GAMMA 0.02). With
    # max_iter 40000 the step lies beyond the run (detectron2 drops it), so the LR is constant
    # 0.01 after the warmup, as in the original; written as the original's values rather than
    # () so that a longer run (the yaml's own MAX_ITER is 160000) decays where it would.
    c.lr_steps = (80000,)
    c.lr_gamma = 0.02
    c.warmup_iters = 1000
    c.warmup_factor = 0.001
    c.momentum = 0.9
    c.weight_decay = 5e-5
    c.clip_norm = 1.0  # per parameter tensor
    c.seed = 0
    c.log_every = 20
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    # Periodic class-agnostic evaluation ('' = off): a COCO JSON and its image folder. The
    # resized validation images are padded to the training buckets (data.buckets, or the
    # loader's defaults, which hold every 800 x 1333 test size).
    c.val_json = ""
    c.val_images = ""
    c.eval_every = 5000
    c.val_short_edge = 800  # detectron2's test-time ResizeShortestEdge
    c.val_max_size = 1333
    c.val_batch_size = 1
    c.val_max_images = -1  # -1 = all
    # PreciseBN (the original's TEST.PRECISE_BN ENABLED True, NUM_ITER 200, run at its
    # EVAL_PERIOD 5000 and at the last step): BN statistics recomputed over training batches
    # (copy-paste off, float32, as the original's hook) before the checkpoint and evaluation.
    # Estimator: "population" (fvcore's since mid-2021, what HASSOD ran) or "mean" (older
    # fvcore: the average of the batch means and unbiased variances). See train/precise_bn.py.
    c.precise_bn = True
    c.precise_bn_every = 5000  # 0 = only at the last step
    c.precise_bn_iters = 200
    c.precise_bn_estimator = "population"
    c.precise_bn_dtype = "float32"
    c.data = ml_collections.ConfigDict(
        dict(
            short_edges=(240, 320, 480, 640, 672, 704, 736, 768, 800, 1024),
            max_size=1333,
            flip_prob=0.5,
            copy_paste=True,
            copy_paste_rate=1.0,
            copy_paste_min_ratio=0.3,
            copy_paste_max_ratio=1.0,
            buckets=(),  # () = the loader's default padding buckets
            max_instances=100,
            pack_masks=True,
            workers=4,
        )
    )
    return c


def prediction():
    """mode=predict: a trained detector on a user's images, like detectron2's and HASSOD's demo
    (`demo.py --input ... --confidence-threshold 0.5 --hier-level whole part`)."""
    c = ml_collections.ConfigDict()
    c.mode = "predict"
    # A training workdir (its newest checkpoint), one orbax step directory, an exported model
    # directory, or a detectron2/HASSOD .pth (e.g. the released HASSOD model).
    c.checkpoint = config_dict.placeholder(str)
    # A folder of images, a glob ('photos/*.jpg'), one image file, or a COCO JSON.
    c.images = config_dict.placeholder(str)
    c.image_dir = ""  # with a COCO JSON: the folder of its file_names (default: the JSON's)
    c.which = "student"  # Mean Teacher .pth files hold both: 'student' (released) or 'teacher'
    c.score_threshold = 0.5  # keep detections with score >= this (HASSOD demo's default)
    c.levels = "whole,part,subpart"  # levels to keep: any comma-separated subset
    c.detections = 1000  # detections per image before the threshold (the original's 1000)
    c.short_edge = 800  # detectron2's test-time ResizeShortestEdge
    c.max_size = 1333
    # Padding: () pads each image to its own size rounded up to 32 (exact, as detectron2; one
    # compile per padded size); or ((h, w), ...) multiples of 32: fewer compiles.
    c.buckets = ()
    c.batch_size = 0  # images per call, a multiple of the local devices; 0 = one per device
    c.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.max_images = -1  # -1 = all
    c.max_pictures = 50  # pictures of the first images; -1 = all, 0 = none
    c.panel_per_level = False  # pictures with one panel per level
    c.log_every_s = 10.0
    return c


def mean_teacher():
    """Stage 2.3, Mean Teacher, as the original HASSOD code runs it (its
    cascade_mask_rcnn_R_50_FPN_MT.yaml and 4_mean_teacher.sh; docs/recipe.md, Mean Teacher)."""
    c = ml_collections.ConfigDict()
    c.mode = "mean_teacher"
    # The stage-2.2 detector both student and teacher start from: a training workdir of ours
    # (its newest checkpoint), an orbax step or exported model directory, or a detectron2/HASSOD
    # .pth (its PreciseBN statistics come with it).
    c.init_checkpoint = config_dict.placeholder(str)
    c.init_which = "student"  # for Mean Teacher .pth files holding both
    c.train_json = config_dict.placeholder(str)  # the stage-1 pseudo-labels (both streams)
    c.images = config_dict.placeholder(str)
    # Widths come from init_checkpoint; set fields override the rest (the original turns
    # DropLoss off).
    c.model = detector_fields(use_droploss=False)
    c.dtype = "float32"  # the original's MT step is not mixed precision
    c.batch_size_label = 8  # global, over all devices and hosts
    c.batch_size_unlabel = 8
    c.max_iter = 2000
    c.base_lr = 0.01  # WarmupCosineLR: 1000 warmup steps, so the peak is 0.005 at step 1000
    c.warmup_iters = 1000
    c.warmup_factor = 0.001
    c.momentum = 0.9
    c.weight_decay = 5e-5
    c.clip_norm = 1.0
    c.ema_keep = 0.9996  # teacher <- keep * teacher + (1 - keep) * student, every step
    c.score_thresh = 0.7  # teacher detections with score > this become targets
    c.coverage = 0.75  # θ_cover of the level tree on the teacher's masks
    # Target slots per image: -1 = one per teacher detection (model.detections_per_image), so
    # every detection above score_thresh is a target, as in the original; a smaller cap saves
    # memory and keeps the highest-scoring ones (the metrics teacher/dropped_per_image and
    # teacher/capped_images count what it leaves out).
    c.max_targets = -1
    # 'adaptive' (the recipe): w_sup = sup_weight * (1 + cos(pi t / T)) / 2 and
    # w_unsup = unsup_weight + 1 - w_sup; 'constant': w_sup = sup_weight, w_unsup = unsup_weight
    # at every step (the "+ Mean Teacher" ablation row, without adaptive targets).
    c.loss_weights = "adaptive"
    c.sup_weight = 1.0
    c.unsup_weight = 2.0
    c.unsup = True  # False: the unlabeled branch left out (ablation: plain continued training)
    c.seed = 0
    c.log_every = 20
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.val_json = ""
    c.val_images = ""
    c.eval_every = 500  # student AND teacher are evaluated
    c.val_short_edge = 800
    c.val_max_size = 1333
    c.val_batch_size = 1
    c.val_max_images = -1
    c.data = training().data
    c.data.copy_paste = False
    return c


def _toy_stage2(c):
    """The fields both toy presets share: the sampler and proposal counts of a small model, 4
    steps, 96 x 128 scenes."""
    c.model.pooler_sampling_ratio = 2
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 64
    c.model.roi_batch_size_per_image = 32
    c.max_iter = 4
    c.warmup_iters = 2
    c.log_every = 1
    c.data.short_edges = (96,)
    c.data.max_size = 128
    c.data.buckets = ((96, 128), (128, 96), (128, 128))
    c.data.max_instances = 8
    c.data.workers = 0
    return c


def toy_training():
    """mode=train at toy scale (`configs/train_coco.py:toy`): the small detector on 96 x 128
    generated scenes, 4 steps of 2 images in float32, on a CPU in seconds; for tests and the
    reproduction chain's dry run, which set the data and their checkpoint cadence."""
    c = _toy_stage2(training())
    c.model.size = "small"
    c.dtype = "float32"
    c.batch_size = 2
    return c


def toy_mean_teacher():
    """mode=mean_teacher at toy scale (`configs/mean_teacher_coco.py:toy`): from a toy detector
    (widths from its checkpoint), 4 steps of 2 + 2 images, every teacher detection above score 0
    a target (a barely trained teacher scores low), at most 8 per image."""
    c = _toy_stage2(mean_teacher())
    c.model.rpn_pre_nms_topk_test = 64
    c.model.rpn_post_nms_topk_test = 32
    c.model.detections_per_image = 32
    c.model.mask_max_fg = 8
    c.score_thresh = 0.0
    c.max_targets = 8
    c.batch_size_label = 2
    c.batch_size_unlabel = 2
    return c


def preset(name, recipe, toy, config_file):
    """get_config(arg) of a config file with a toy preset: the recipe without an argument,
    `toy()` for 'toy'."""
    if not name:
        return recipe()
    if name == "toy":
        return toy()
    raise ValueError(f"{config_file} takes no argument or ':toy', got {name!r}")


def prepare_gt():
    """mode=prepare_gt: class-agnostic COCO ground truth ({id 1, "fg"}) from a benchmark's
    official files (the rules: hassod_jax/data/prepare_gt.py and docs/reproduce.md)."""
    c = ml_collections.ConfigDict()
    c.mode = "prepare_gt"
    # coco | lvis | coco_lvis | objects365 | sa1b | uvo | kitti
    c.format = config_dict.placeholder(str)
    # The official file (coco, lvis, objects365, uvo; coco_lvis: COCO's instances_val2017.json)
    # or folder (sa1b: the per-image JSONs; kitti: the object benchmark's training/).
    c.input = config_dict.placeholder(str)
    c.lvis_json = ""  # coco_lvis: LVIS v1's lvis_v1_val.json
    c.output = ""  # default: W/<format>_cls_agnostic.json
    c.max_images = -1  # the first N images (file order; natural name order for sa1b); -1 = all
    # coco_lvis duplicates: 'vs_coco' (ours) leaves out an LVIS instance with mask IoU >=
    # dedup_iou with a COCO instance of its image; 'cutler' (CutLER's published merge) keeps
    # the COCO instances, then an LVIS one only below IoU 0.5 with every instance kept so far.
    # The summary gives both rules' counts; the original's rule is unpublished.
    c.dedup_rule = "vs_coco"
    c.dedup_iou = 0.9
    # lvis: file_name from coco_url's last two parts ('split': val2017/000000397133.jpg, for
    # the COCO folder as the one image root, as detectron2's LVIS loader and CutLER's
    # class-agnostic LVIS set use it) or its last ('last': 000000397133.jpg, for one folder
    # holding the images of both splits).
    c.lvis_file_name = "split"
    c.kitti_dontcare = "crowd"  # kitti: DontCare regions as iscrowd 1 ('crowd') or 'drop'
    # False: malformed records are skipped and counted in the summary; True: the first one
    # stops the run with one line naming the file and the record.
    c.strict = False
    c.max_examples = 5  # records listed per reason in the summary
    return c
