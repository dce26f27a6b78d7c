"""The paper's main row: HASSOD on Objects365, LVIS and SA-1B, and the detector ablation rows on
COCO+LVIS val: the two that the same run gives (+ level head: the stage-2.2 detector; + adaptive
targets: the final Mean Teacher student) and, with --ablations, the two that need runs of their
own (plain: stage 2.2 with the level loss weighted 0; + Mean Teacher: Mean Teacher with
constant loss weights).

    python tools/reproduce/hassod.py --work /runs/hassod \
        --coco /data/coco --lvis /data/lvis/lvis_v1_val.json \
        --objects365-json /data/objects365/val/zhiyuan_objv2_val.json \
        --objects365-images /data/objects365/val \
        --sa1b /data/sa1b/sa_000000 \
        --dino-vit /weights/dino_vitbase8_pretrain.pth \
        --dino-resnet /weights/dino_resnet50_pretrain.pth \
        --gpus 8 [--hosts H --host-index I --launcher local|distributed] [--dry-run]

Stages (each skipped when done, each resuming; `--stages a,b` runs a subset):
  gt_coco_lvis, gt_lvis, gt_objects365, gt_sa1b   class-agnostic ground truth (prepare_gt)
  stage1_list                                       COCO train2017 + unlabeled2017 image list
  discover [+ discover_merge]                       stage 1 pseudo-labels (sharded, merged)
  train                                             stage 2.2, 40k steps at batch 16
  mean_teacher                                      stage 2.3, 2k steps at 8 + 8
  train_plain, mean_teacher_constant                --ablations: the "plain" and
                                                    "+ Mean Teacher" rows' runs
  predict_* / evaluate_*                            detections (score > 0, 1000 per image)
                                                    and COCO AP/AR on every benchmark, plus
                                                    the stage-2.2 detector on COCO+LVIS
  table                                             W/table.md and W/table.json, beside the
                                                    published numbers
Layout expected (the official downloads): COCO_ROOT/{train2017,unlabeled2017,val2017}/*.jpg and
COCO_ROOT/annotations/instances_val2017.json; LVIS v1's lvis_v1_val.json (its images are read
from COCO_ROOT by coco_url's split and name); Objects365 v2's zhiyuan_objv2_val.json with its
file_names relative to --objects365-images; SA-1B's first pack sa_000000 extracted (sa_<n>.jpg
beside sa_<n>.json).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chain  # noqa: E402
from chain import Input, Stage  # noqa: E402

BENCHMARKS = ("coco_lvis", "lvis", "objects365", "sa1b")
# The ablation rows that need runs of their own (--ablations): how each is made.
ABLATION_ONLY = {
    "plain": "stage 2.2 again with model.level_loss_weight=0",
    "+ Mean Teacher": "Mean Teacher again from the stage-2.2 detector with loss_weights=constant",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    chain.add_common_arguments(p)
    p.add_argument("--coco", required=True, help="COCO root (train2017/, unlabeled2017/, ...)")
    p.add_argument("--lvis", default="", help="lvis_v1_val.json")
    p.add_argument("--objects365-json", default="", help="Objects365 v2 zhiyuan_objv2_val.json")
    p.add_argument(
        "--objects365-images",
        default="",
        help="the folder the Objects365 file_names are relative to",
    )
    p.add_argument("--sa1b", default="", help="the extracted SA-1B pack sa_000000")
    p.add_argument(
        "--sa1b-max-images",
        type=int,
        default=-1,
        help="the first N SA-1B images (natural order); -1 = the whole pack",
    )
    p.add_argument("--dino-vit", default="", help="dino_vitbase8_pretrain.pth (stage 1)")
    p.add_argument(
        "--dino-resnet",
        default="",
        help="dino_resnet50_pretrain.pth or the d2 .pkl (stage 2); 'none' = random",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also the detector ablation rows that need runs of their own: 'plain' (stage 2.2 "
        "without the level loss) and '+ Mean Teacher' (constant loss weights); each costs "
        "about as much as the run it varies",
    )
    p.add_argument(
        "--benchmarks",
        default=",".join(BENCHMARKS),
        help=f"evaluated benchmarks, a subset of {','.join(BENCHMARKS)}",
    )
    return p.parse_args(argv)


def paths(args):
    w = os.path.abspath(args.work)
    return {
        "gt": os.path.join(w, "gt"),
        "stage1": os.path.join(w, "stage1"),
        "image_list": os.path.join(w, "stage1", "image_list.json"),
        "pseudo_labels": os.path.join(w, "stage1", "pseudo_labels", "pseudo_labels_hier.json"),
        "train": os.path.join(w, "train"),
        "mean_teacher": os.path.join(w, "mean_teacher"),
        "student": os.path.join(w, "mean_teacher", "model_final"),
        "plain": os.path.join(w, "ablation_plain"),
        "mt_constant": os.path.join(w, "ablation_mean_teacher_constant"),
        "eval": os.path.join(w, "eval"),
        "table": os.path.join(w, "table.md"),
    }


def gt_file(args, name):
    return os.path.join(paths(args)["gt"], f"{name}_cls_agnostic.json")


def benchmark_images(args, name):
    coco = os.path.abspath(args.coco)
    return {
        "coco_lvis": os.path.join(coco, "val2017"),
        "lvis": coco,
        "objects365": args.objects365_images,
        "sa1b": args.sa1b,
    }[name]


def build(args):
    P = paths(args)
    coco = os.path.abspath(args.coco)
    val_json = os.path.join(coco, "annotations", "instances_val2017.json")
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    problems = []
    for b in benchmarks:
        if b not in BENCHMARKS:
            problems.append(f"--benchmarks: unknown {b!r} (choose from {', '.join(BENCHMARKS)})")
    stages = []
    selected = {n.strip() for n in args.stages.split(",") if n.strip()}

    def wants(name):
        return not selected or name in selected

    def wants_benchmark(b):
        return any(wants(f"{k}{b}") for k in ("gt_", "predict_final_", "evaluate_final_")) or (
            b == "coco_lvis"
            and any(wants(f"{k}stage2_coco_lvis") for k in ("predict_", "evaluate_"))
        )

    # COCO+LVIS is always scored (the ablation rows); an argument is needed only when a
    # selected stage uses it.
    if (wants_benchmark("coco_lvis") or "lvis" in benchmarks and wants_benchmark("lvis")) and (
        not args.lvis
    ):
        problems.append("--lvis lvis_v1_val.json is needed for the coco_lvis and lvis benchmarks")
    if (
        "objects365" in benchmarks
        and wants_benchmark("objects365")
        and not (args.objects365_json and args.objects365_images)
    ):
        problems.append("objects365: pass --objects365-json and --objects365-images")
    if "sa1b" in benchmarks and wants_benchmark("sa1b") and not args.sa1b:
        problems.append("sa1b: pass --sa1b (the extracted sa_000000 folder)")

    # Ground truth: always COCO+LVIS (the ablation rows are scored on it).
    gt_inputs = {
        "coco_lvis": (
            "coco_lvis",
            {"input": val_json, "lvis_json": args.lvis},
            [Input("COCO val2017 annotations", val_json), Input("LVIS v1 val", args.lvis)],
        ),
        "lvis": (
            "lvis",
            {"input": args.lvis, "lvis_file_name": "split"},
            [Input("LVIS v1 val", args.lvis)],
        ),
        "objects365": (
            "objects365",
            {"input": args.objects365_json},
            [Input("Objects365 v2 val", args.objects365_json)],
        ),
        "sa1b": (
            "sa1b",
            {"input": args.sa1b, "max_images": args.sa1b_max_images},
            [Input("SA-1B pack", args.sa1b, "dir")],
        ),
    }
    for b in ["coco_lvis"] + [b for b in benchmarks if b != "coco_lvis"]:
        if b not in gt_inputs:
            continue
        fmt, fields, inputs = gt_inputs[b]
        stages.append(
            chain.prepare_gt_stage(args, f"gt_{b}", fmt, gt_file(args, b), fields, inputs)
        )

    # Stage 1.
    folders = ("train2017", "unlabeled2017")
    stages.append(
        Stage(
            name="stage1_list",
            what="the image list of COCO train2017 + unlabeled2017 (file names relative to "
            f"{coco})",
            inputs=[Input(f"COCO {f}", os.path.join(coco, f), "images") for f in folders],
            outputs=[P["image_list"]],
            python=lambda: print(
                f"  {chain.write_image_list(coco, folders, P['image_list'])} "
                f"images listed in {P['image_list']}"
            ),
        )
    )
    disc = {"dino_checkpoint": args.dino_vit} if args.dino_vit else {}
    if not args.toy and not args.dino_vit and wants("discover"):
        problems.append(
            "--dino-vit dino_vitbase8_pretrain.pth is needed for stage 1 "
            "(--toy uses the weight-free stand-in)"
        )
    list_input = Input("stage-1 image list", P["image_list"], produced_by="stage1_list")
    d_stages = chain.discovery_stages(
        args, "discover", P["stage1"], coco, P["image_list"], disc, list_input
    )
    if args.dino_vit:
        d_stages[0].inputs.append(Input("DINO ViT-B/8", args.dino_vit, "checkpoint"))
    stages += d_stages
    labels_from = d_stages[-1].name

    # Stage 2.2 and 2.3, and with --ablations the two rows they do not give: "plain" (2.2 with
    # the level loss weighted 0) and "+ Mean Teacher" (2.3 with constant loss weights).
    labels = Input("pseudo-labels", P["pseudo_labels"], produced_by=labels_from)
    stages.append(_train_stage(args, problems, wants, "train", P["train"], {}, labels,
                               "stage 2.2: Cascade Mask R-CNN on the pseudo-labels"))
    stages.append(_mean_teacher_stage(
        args, problems, wants, "mean_teacher", P["mean_teacher"], "train", P["train"], {},
        labels, "stage 2.3: Mean Teacher with adaptive targets"))
    if args.ablations:
        stages.append(_train_stage(
            args, problems, wants, "train_plain", P["plain"], {"model.level_loss_weight": 0.0},
            labels, "ablation 'plain': stage 2.2 with the level loss weighted 0 (no level head)"))
        stages.append(_mean_teacher_stage(
            args, problems, wants, "mean_teacher_constant", P["mt_constant"], "train",
            P["train"], {"loss_weights": "constant"}, labels,
            "ablation '+ Mean Teacher': stage 2.3 with constant loss weights (1 and 2), no "
            "adaptive targets"))

    if args.hosts > 1 and args.launcher == "local" and (wants("train") or wants("mean_teacher")):
        problems.append(
            "train / mean_teacher over several hosts need --launcher distributed (one process "
            "per host under jax.distributed); --launcher local runs only discovery's "
            "independent jobs across hosts (--stages stage1_list,discover,discover_merge)"
        )

    # Evaluation: the student on every benchmark, the stage-2.2 detector on COCO+LVIS.
    runs = [("stage2", P["train"], "train", "coco_lvis")]
    if args.ablations:
        runs += [("plain", P["plain"], "train_plain", "coco_lvis"),
                 ("mt_constant", os.path.join(P["mt_constant"], "model_final"),
                  "mean_teacher_constant", "coco_lvis")]
    runs += [("final", P["student"], "mean_teacher", b) for b in benchmarks]
    for tag, ckpt, producer, b in runs:
        if b not in gt_inputs:
            continue
        name = f"{tag}_{b}"
        out = os.path.join(P["eval"], name)
        warnings = []
        if b == "objects365":
            warnings.append(
                "predict writes a mask for each of up to 1000 detections on each of the 80,000 "
                "images (tens of GB of JSON, held in memory by evaluate); mode=predict has no "
                "boxes-only switch yet"
            )
        stages.append(
            chain.predict_stage(
                args,
                f"predict_{name}",
                ckpt,
                gt_file(args, b),
                benchmark_images(args, b),
                os.path.join(out, "predict"),
                producer,
                f"gt_{b}",
                warnings,
            )
        )
        iou = ("bbox",) if b == "objects365" else ("bbox", "segm")
        stages.append(
            chain.evaluate_stage(
                args,
                f"evaluate_{name}",
                gt_file(args, b),
                os.path.join(out, "predict", "predictions.json"),
                out,
                f"predict_{name}",
                f"gt_{b}",
                iou,
            )
        )
    stages.append(
        Stage(
            name="table",
            what=f"the paper's table from the evaluations -> {P['table']}",
            python=lambda: print(write_table(args)),
            host0_only=True,
        )
    )
    return stages, problems


def _train_stage(args, problems, wants, name, workdir, extra, labels, what):
    """A stage-2.2 run (`name`, in `workdir`) of configs/train_coco.py with `extra` fields."""
    coco = os.path.abspath(args.coco)
    fields = {"train_json": labels.path, "images": coco, **extra}
    if args.dino_resnet and args.dino_resnet != "none":
        fields["resnet_checkpoint"] = args.dino_resnet
    elif not args.toy and not args.dino_resnet and wants(name):
        problems.append(
            f"{name}: --dino-resnet dino_resnet50_pretrain.pth is needed for stage 2 "
            "('none' starts from random weights)"
        )
    fields = chain.with_overrides(args, "train", fields)
    config = chain.config_for(args, "train", "train_coco.py")
    max_iter = int(chain.config_value(config, "max_iter", fields))
    if wants(name):
        chain.check_batch(args, problems, name, int(chain.config_value(config, "batch_size",
                                                                        fields)))
    inputs = [labels, Input("COCO images", coco, "dir")]
    if "resnet_checkpoint" in fields:
        inputs.append(Input("DINO ResNet-50", fields["resnet_checkpoint"], "checkpoint"))
    return Stage(
        name=name,
        what=f"{what}, {max_iter} steps",
        commands=[(chain.mode_cmd(config, workdir, fields), chain.host_env(args))],
        inputs=inputs,
        outputs=[os.path.join(workdir, "checkpoints", str(max_iter))],
        workdir=workdir,
        status=lambda: _ckpt_status(workdir, max_iter),
    )


def _mean_teacher_stage(args, problems, wants, name, workdir, init_stage, init, extra, labels,
                        what):
    """A Mean Teacher run (`name`, in `workdir`) from the detector `init_stage` made in `init`;
    its student is exported to workdir/model_final."""
    fields = chain.with_overrides(
        args,
        "mean_teacher",
        {"init_checkpoint": init, "train_json": labels.path, "images": os.path.abspath(args.coco),
         **extra},
    )
    config = chain.config_for(args, "mean_teacher", "mean_teacher_coco.py")
    max_iter = int(chain.config_value(config, "max_iter", fields))
    if wants(name):
        for k in ("batch_size_label", "batch_size_unlabel"):
            chain.check_batch(args, problems, f"{name} {k}",
                              int(chain.config_value(config, k, fields)))
    student = os.path.join(workdir, "model_final")
    return Stage(
        name=name,
        what=f"{what}, {max_iter} steps; the student is exported to {student}",
        commands=[(chain.mode_cmd(config, workdir, fields), chain.host_env(args))],
        inputs=[Input("stage-2.2 detector", init, "checkpoint", produced_by=init_stage), labels],
        outputs=[student],
        workdir=workdir,
        status=lambda: _ckpt_status(workdir, max_iter),
    )


def _ckpt_status(workdir, max_iter):
    step = chain.checkpoint_step(workdir)
    return f"resumes at step {step} of {max_iter}" if step else "to run"


def write_table(args):
    """W/table.md and W/table.json in the paper's layout: ours (paper), x100."""
    P = paths(args)

    def ev(name):
        return chain.read_eval(os.path.join(P["eval"], name, "eval.json"))

    rows, lines = {}, []
    lines.append(
        "HASSOD, class-agnostic, AR at 1000 detections per image (AR@100 in "
        "table.json), x100: ours (paper)"
    )
    lines.append("")
    lines.append("| benchmark | Box AR | Box AP | Mask AR | Mask AP |")
    lines.append("|---|---|---|---|---|")
    for b in ("objects365", "lvis", "sa1b"):
        e = ev(f"final_{b}")
        ours = {
            "Box AR": chain.metric(e, "bbox", chain.AR_KEY),
            "Box AP": chain.metric(e, "bbox", "AP"),
            "Mask AR": chain.metric(e, "segm", chain.AR_KEY),
            "Mask AP": chain.metric(e, "segm", "AP"),
        }
        paper = chain.PAPER_MAIN[b]
        rows[b] = {
            "ours": ours,
            "paper": paper,
            "ours_AR@100": {
                "bbox": chain.metric(e, "bbox", "AR@100"),
                "segm": chain.metric(e, "segm", "AR@100"),
            },
            "evaluated": e is not None,
        }
        cells = " | ".join(chain.cell(ours[k], paper[k]) for k in paper)
        lines.append(f"| {chain.BENCHMARK_NAMES[b]} | {cells} |")
    lines.append("")
    lines.append("Ablation on COCO+LVIS val2017: Mask AR / Mask AP, ours (paper)")
    lines.append("")
    lines.append("| row | Mask AR | Mask AP |")
    lines.append("|---|---|---|")
    sources = {"plain": "plain_coco_lvis", "+ level head": "stage2_coco_lvis",
               "+ Mean Teacher": "mt_constant_coco_lvis",
               "+ adaptive targets": "final_coco_lvis"}
    for row, (par, pap) in chain.PAPER_DETECTOR_ABLATION.items():
        if row in ABLATION_ONLY and not args.ablations:
            lines.append(f"| {row} | not run ({par:.1f}) | not run ({pap:.1f}) |")
            rows[row] = {"paper": [par, pap], "not_run": ABLATION_ONLY[row]}
            continue
        e = ev(sources[row])
        ar, ap = chain.metric(e, "segm", chain.AR_KEY), chain.metric(e, "segm", "AP")
        rows[row] = {"ours": [ar, ap], "paper": [par, pap], "evaluated": e is not None}
        lines.append(f"| {row} | {chain.cell(ar, par)} | {chain.cell(ap, pap)} |")
    if not args.ablations:
        for row, how in ABLATION_ONLY.items():
            lines.append(f"\n{row}: not run; --ablations adds it ({how}).")
    text = "\n".join(lines) + "\n"
    sys.path.insert(0, chain.REPO)
    from hassod_jax import utils

    utils.atomic_write_bytes(P["table"], text.encode("utf-8"))
    utils.atomic_write_json(
        P["table"][:-3] + ".json", {"toy": bool(args.toy), "rows": rows}, indent=1
    )
    return text


def main(argv=None):
    args = parse_args(argv)
    stages, problems = build(args)
    title = "HASSOD main table and detector ablations (tools/reproduce/hassod.py)"
    return chain.main_flow(args, stages, title, problems)


if __name__ == "__main__":
    sys.exit(main())
