"""The paper's pseudo-label ablation rows: stage 1 on the COCO+LVIS val2017 images, each HAC
threshold's pseudo-labels (0.1, 0.2, 0.4) and their ensemble scored against the class-agnostic
COCO+LVIS ground truth (Mask AR / Mask AP and labels per image; paper: 4.1/1.8 (2.58),
5.3/1.8 (4.20), 7.8/1.3 (11.61), ensemble 8.9/1.7 (12.69)).

    python tools/reproduce/pseudo_labels.py --work /runs/pl \
        --coco /data/coco --lvis /data/lvis/lvis_v1_val.json \
        --dino-vit /weights/dino_vitbase8_pretrain.pth --gpus 8 [--dry-run]

Stages: gt_coco_lvis, discover [+ discover_merge], evaluate_<θ> / evaluate_ensemble, table.
The MaskCut row (3.5/1.5, 1.85 per image) is CutLER's method and not reproduced here.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chain  # noqa: E402
from chain import Input, Stage  # noqa: E402

THRESHOLDS = (0.4, 0.2, 0.1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    chain.add_common_arguments(p)
    p.add_argument("--coco", required=True, help="COCO root (val2017/, annotations/)")
    p.add_argument("--lvis", required=True, help="lvis_v1_val.json")
    p.add_argument("--dino-vit", default="", help="dino_vitbase8_pretrain.pth")
    return p.parse_args(argv)


def paths(args):
    w = os.path.abspath(args.work)
    return {
        "gt": os.path.join(w, "gt", "coco_lvis_cls_agnostic.json"),
        "discover": os.path.join(w, "discover_val"),
        "labels": os.path.join(w, "discover_val", "pseudo_labels"),
        "eval": os.path.join(w, "eval"),
        "table": os.path.join(w, "table.md"),
    }


def label_files(args):
    """(row name, file) for each threshold and the ensemble."""
    P = paths(args)
    out = [(f"{t:g}", os.path.join(P["labels"], f"thresh_{t:g}.json")) for t in THRESHOLDS]
    return out + [("ensemble", os.path.join(P["labels"], "pseudo_labels_hier.json"))]


def build(args):
    P = paths(args)
    coco = os.path.abspath(args.coco)
    val_json = os.path.join(coco, "annotations", "instances_val2017.json")
    problems = []
    stages = [
        chain.prepare_gt_stage(
            args,
            "gt_coco_lvis",
            "coco_lvis",
            P["gt"],
            {"input": val_json, "lvis_json": args.lvis},
            [Input("COCO val2017 annotations", val_json), Input("LVIS v1 val", args.lvis)],
        )
    ]
    disc = {"thresholds": "(" + ",".join(f"{t:g}" for t in THRESHOLDS) + ")"}
    if args.dino_vit:
        disc["dino_checkpoint"] = args.dino_vit
    elif not args.toy:
        problems.append(
            "--dino-vit dino_vitbase8_pretrain.pth is needed (--toy uses the weight-free stand-in)"
        )
    gt_input = Input("COCO+LVIS ground truth (the image list)", P["gt"], produced_by="gt_coco_lvis")
    d = chain.discovery_stages(
        args, "discover", P["discover"], os.path.join(coco, "val2017"), P["gt"], disc, gt_input
    )
    d[0].inputs.append(Input("COCO val2017", os.path.join(coco, "val2017"), "images"))
    if args.dino_vit:
        d[0].inputs.append(Input("DINO ViT-B/8", args.dino_vit, "checkpoint"))
    stages += d
    for row, path in label_files(args):
        stages.append(
            chain.evaluate_stage(
                args,
                f"evaluate_{row}",
                P["gt"],
                path,
                os.path.join(P["eval"], row),
                d[-1].name,
                "gt_coco_lvis",
            )
        )
    stages.append(
        Stage(
            name="table",
            what=f"the ablation rows from the evaluations -> {P['table']}",
            python=lambda: print(write_table(args)),
            host0_only=True,
        )
    )
    return stages, problems


def write_table(args):
    P = paths(args)
    lines = [
        "Pseudo-labels on COCO+LVIS val2017 (class-agnostic, AR at 1000 per image, x100): "
        "ours (paper)",
        "",
        "| pseudo-labels | Mask AR | Mask AP | labels per image |",
        "|---|---|---|---|",
    ]
    rows = {}
    for row, _ in label_files(args):
        e = chain.read_eval(os.path.join(P["eval"], row, "eval.json"))
        ar, ap = chain.metric(e, "segm", chain.AR_KEY), chain.metric(e, "segm", "AP")
        per_image = None
        if e is not None and e.get("images", {}).get("count"):
            per_image = round(e["num_predictions"] / e["images"]["count"], 2)
        par, pap, pper = chain.PAPER_PSEUDO_LABELS[row]
        rows[row] = {"ours": [ar, ap, per_image], "paper": [par, pap, pper]}
        name = f"θ = {row}" if row != "ensemble" else "ensemble (0.1, 0.2, 0.4)"
        per = "–" if per_image is None else f"{per_image:.2f}"
        lines.append(
            f"| {name} | {chain.cell(ar, par)} | {chain.cell(ap, pap)} | {per} ({pper:.2f}) |"
        )
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
    return chain.main_flow(
        args,
        stages,
        "Pseudo-label ablation rows (tools/reproduce/pseudo_labels.py)",
        problems,
    )


if __name__ == "__main__":
    sys.exit(main())
