"""The reproduction's cost, stage by stage, from the figures measured in experiments/RESULTS.md.

    python tools/reproduce/plan.py --gpus 8 --kind h200
    python tools/reproduce/plan.py --gpus 1 --kind cpu [--json]

Every rate is read from RESULTS.md at run time (its date, section and row are printed beside
it); a figure that RESULTS.md lacks is reported as missing, never guessed. Where a bound
follows from a measured figure (e.g. a float32 stage from a bfloat16 rate), it is printed as a
bound and says so. Scaling over several devices is assumed linear (not measured): discovery
runs independent jobs, one per device, each with the measured machine's CPU share (16 cores
per H200); training is data-parallel. `--kind cpu` counts machines like the measured one (2
cores, no GPU).

The work: COCO train2017 + unlabeled2017 = 118,287 + 123,403 = 241,690 images in stage 1;
stage 2.2 40,000 steps x 16 images; Mean Teacher 2,000 steps, each 16 supervised views and 8
strong unlabeled views through the student (forward + backward) and 8 weak views through the
teacher (forward); evaluation on COCO+LVIS val2017 (5,000 images), LVIS v1 val (19,809),
Objects365 v2 val (80,000), SA-1B sa_000000 (about 11,000).
"""

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "experiments", "RESULTS.md")

STAGE1_IMAGES = 118_287 + 123_403
TRAIN_IMAGES = 40_000 * 16
MT_STUDENT_IMAGES = 2_000 * (16 + 8)
MT_TEACHER_IMAGES = 2_000 * 8
PRECISE_BN_IMAGES = 8 * 200 * 16  # every 5000 of 40000 steps (the last one included)
EVAL_IMAGES = {
    "COCO+LVIS val2017": 5_000,
    "LVIS v1 val": 19_809,
    "Objects365 v2 val": 80_000,
    "SA-1B sa_000000": 11_000,
}

# (name, section heading, {column: start of the cell}, column read, unit)
FIGURES = {
    "discovery_h200": ("Discovery end to end", {"machine": "H200", "images": "48"}, "s per image"),
    "discovery_cpu": (
        "Discovery end to end",
        {"machine": "CPU", "CRF": "pydensecrf"},
        "s per image",
    ),
    "train_h200": (
        "Detector forward + backward",
        {"machine": "H200", "model": "ours", "dtype": "bfloat16"},
        "images/s",
    ),
    "train_cpu_r50": (
        "Detector forward + backward",
        {"part": "whole step, adaptive ROIAlign cap 4"},
        "after, ms",
    ),
}
PUBLISHED = [
    "pseudo-labels: 13.8 s per image on one worker, 1.59 s per image on a 4xA100 node with "
    "8-16 workers, about a day on four such nodes for COCO",
    "detector: 40k iterations at batch 16, about 20 h on 4xA100",
]


def _cells(line):
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]


def read_tables(path):
    """[(date, section, header cells, [row cells, raw line])] of every table in RESULTS.md."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    tables, date, section, current = [], "", "", None
    for line in lines:
        m = re.match(r"^## (\d{4}-\d{2}-\d{2})", line)
        if m:
            date = m.group(1)
        m = re.match(r"^### (.+)", line)
        if m:
            section = m.group(1).strip()
        if line.lstrip().startswith("|"):
            if current is None:
                current = (date, section, _cells(line), [])
                tables.append(current)
            elif not re.match(r"^\s*\|[\s:|-]+\|\s*$", line):
                current[3].append((_cells(line), line.strip()))
        else:
            current = None
    return tables


def _number(text):
    m = re.match(r"^[^\d-]*(-?[\d,]*\.?\d+)", text)
    return float(m.group(1).replace(",", "")) if m else None


def find_figure(tables, name):
    """{'value', 'date', 'section', 'row'} for FIGURES[name], or None when RESULTS.md has no
    such row (or the cell holds no number)."""
    section, match, column = FIGURES[name]
    for date, sec, header, rows in tables:
        if section not in sec or column not in header:
            continue
        if any(k not in header for k in match):
            continue
        for cells, raw in rows:
            if len(cells) != len(header):
                continue
            row = dict(zip(header, cells))
            if all(row[k].startswith(v) for k, v in match.items()):
                value = _number(row[column])
                if value is None:
                    return None
                return {"value": value, "date": date, "section": sec, "row": raw, "column": column}
    return None


def _hours(seconds):
    if seconds is None:
        return None
    return seconds / 3600.0


def fmt_time(seconds):
    if seconds is None:
        return "not measured"
    h = seconds / 3600.0
    if h >= 48:
        return f"{h / 24:.1f} days"
    if h >= 1:
        return f"{h:.1f} h"
    return f"{seconds / 60:.1f} min"


def plan(gpus, kind, results=RESULTS):
    """The plan as a dict: stages [{stage, work, rate, time_s, bound, note, cite}], citations,
    the published cost."""
    tables = read_tables(results)
    figs = {n: find_figure(tables, n) for n in FIGURES}
    stages = []

    def add(stage, work, rate_text, time_s, cite=None, bound="", note=""):
        stages.append(
            {
                "stage": stage,
                "work": work,
                "rate": rate_text,
                "time_s": time_s,
                "bound": bound,
                "note": note,
                "cite": cite,
            }
        )

    unit = "H200" if kind == "h200" else "CPU machine"
    # Stage 1.
    f = figs["discovery_h200" if kind == "h200" else "discovery_cpu"]
    if f:
        per_device = 1.0 / f["value"]
        add(
            "stage 1 discovery",
            f"{STAGE1_IMAGES:,} images",
            f"{per_device:.2f} images/s per {unit} ({f['value']:g} s/image)",
            STAGE1_IMAGES * f["value"] / gpus,
            cite="discovery_h200" if kind == "h200" else "discovery_cpu",
            note="independent jobs, one per device; linear scaling assumed"
            + (
                "; with 16 CPU cores per GPU as measured, random-weight ViT (fewer regions "
                "than DINO's, so fewer CRF labels), not steady state"
                if kind == "h200"
                else "; ViT-B/8 float32, pydensecrf"
            ),
        )
    else:
        add("stage 1 discovery", f"{STAGE1_IMAGES:,} images", "missing from RESULTS.md", None)
    add(
        "stage 1 merge",
        "read every chunk, write 4 files",
        "not measured",
        None,
        note="host work, no device",
    )
    # Stage 2.2.
    if kind == "h200" and figs["train_h200"]:
        f = figs["train_h200"]
        t = TRAIN_IMAGES / (f["value"] * gpus)
        add(
            "stage 2.2 training",
            f"{TRAIN_IMAGES:,} images (40,000 x 16)",
            f"{f['value']:g} images/s per H200",
            t,
            cite="train_h200",
            note="forward + backward at 800x1333, batch 2, bfloat16 (bench_detector.py): no "
            "data pipeline, copy-paste or optimizer timed; linear scaling assumed",
        )
        add(
            "  PreciseBN (8 x 200 batches)",
            f"{PRECISE_BN_IMAGES:,} images, forward",
            "not measured",
            None,
            note="at the bfloat16 training rate it would take "
            f"{fmt_time(PRECISE_BN_IMAGES / (f['value'] * gpus))}; forward-only is cheaper and "
            "its float32 dearer, so neither bound holds",
        )
        add(
            "stage 2.3 Mean Teacher",
            f"{MT_STUDENT_IMAGES:,} student + {MT_TEACHER_IMAGES:,} teacher images",
            "not measured",
            None,
            note="float32 (the original's); at the bfloat16 training rate the student alone "
            f"would take {fmt_time(MT_STUDENT_IMAGES / (f['value'] * gpus))}, a lower bound "
            "(float32 is slower)",
        )
    elif kind == "cpu" and figs["train_cpu_r50"]:
        f = figs["train_cpu_r50"]
        rate = 2.0 / (f["value"] / 1000.0)
        add(
            "stage 2.2 training",
            f"{TRAIN_IMAGES:,} images (40,000 x 16)",
            f"{rate:.4f} images/s per CPU machine (R50, 320x512, batch 2)",
            TRAIN_IMAGES / (rate * gpus),
            cite="train_cpu_r50",
            bound="lower bound",
            note="measured at 320x512, smaller than the paper's 240-1024 short sides, "
            "float32 (profile_detector.py --r50)",
        )
        add(
            "  PreciseBN (8 x 200 batches)",
            f"{PRECISE_BN_IMAGES:,} images, forward",
            "not measured",
            None,
        )
        add(
            "stage 2.3 Mean Teacher",
            f"{MT_STUDENT_IMAGES:,} student + {MT_TEACHER_IMAGES:,} teacher images",
            "not measured",
            None,
            note="the student alone at the rate above: "
            f"{fmt_time(MT_STUDENT_IMAGES / (rate * gpus))} (lower bound)",
        )
    else:
        add("stage 2.2 training", f"{TRAIN_IMAGES:,} images", "missing from RESULTS.md", None)
        add("stage 2.3 Mean Teacher", f"{MT_STUDENT_IMAGES:,} student images", "not measured", None)
    # Evaluation.
    for name, n in EVAL_IMAGES.items():
        add(
            f"predict {name}",
            f"{n:,} images, 1000 detections each",
            "not measured",
            None,
            note="no inference throughput of the R50 detector in RESULTS.md",
        )
    add(
        "evaluate (COCOeval, 4 benchmarks)",
        f"{sum(EVAL_IMAGES.values()):,} images",
        "not measured",
        None,
        note="host work (pycocotools)",
    )
    add("prepare_gt (4 benchmarks)", "the official files", "not measured", None, note="host work")
    measured = [s["time_s"] for s in stages if s["time_s"] is not None and not s["bound"]]
    bounds = [s["time_s"] for s in stages if s["time_s"] is not None and s["bound"]]
    cites = {}
    for n, f in figs.items():
        if f and any(s["cite"] == n for s in stages):
            cites[n] = f
    return {
        "gpus": gpus,
        "kind": kind,
        "results": os.path.abspath(results),
        "stages": stages,
        "measured_total_s": sum(measured) if measured else None,
        "lower_bound_total_s": sum(bounds) if bounds else None,
        "citations": cites,
        "missing": [s["stage"].strip() for s in stages if s["time_s"] is None],
        "published": PUBLISHED,
    }


def render(p):
    unit = "H200" if p["kind"] == "h200" else "CPU machine(s) (2 cores)"
    shown = p["results"]
    repo = os.path.dirname(os.path.dirname(HERE))
    if shown.startswith(repo + os.sep):
        shown = os.path.relpath(shown, repo)
    out = [f"Reproduction cost on {p['gpus']} x {unit}, from {shown}", ""]
    refs = {n: k + 1 for k, n in enumerate(p["citations"])}
    w = max(len(s["stage"]) for s in p["stages"])
    out.append(f"{'stage':<{w}}  {'time':>14}  rate [source]; work; notes")
    for s in p["stages"]:
        t = fmt_time(s["time_s"])
        if s["bound"] and s["time_s"] is not None:
            t = ">= " + t
        ref = f" [{refs[s['cite']]}]" if s["cite"] in refs else ""
        line = f"{s['stage']:<{w}}  {t:>14}  {s['rate']}{ref}; {s['work']}"
        if s["note"]:
            line += f"; {s['note']}"
        out.append(line)
    out.append("")
    if p["measured_total_s"] is not None:
        out.append(
            f"sum of the stages with a measured rate: {fmt_time(p['measured_total_s'])}"
            + (
                f", plus lower bounds {fmt_time(p['lower_bound_total_s'])}"
                if p["lower_bound_total_s"]
                else ""
            )
            + f"; not measured: {len(p['missing'])} stage(s) ({', '.join(p['missing'])})"
        )
    elif p["lower_bound_total_s"] is not None:
        out.append(
            f"lower bounds only: {fmt_time(p['lower_bound_total_s'])}; not measured: "
            f"{', '.join(p['missing'])}"
        )
    out.append("")
    out.append("sources (experiments/RESULTS.md):")
    for n, k in refs.items():
        f = p["citations"][n]
        out.append(f'  [{k}] {f["date"]}, "{f["section"]}", column "{f["column"]}": {f["row"]}')
    out.append("")
    out.append("the original's published cost:")
    out += [f"  - {x}" for x in p["published"]]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1, help="devices (H200s, or CPU machines)")
    ap.add_argument("--kind", choices=("h200", "cpu"), default="h200")
    ap.add_argument("--results", default=RESULTS, help="the RESULTS.md to read")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    if a.gpus < 1:
        ap.error("--gpus must be at least 1")
    p = plan(a.gpus, a.kind, a.results)
    print(json.dumps(p, indent=1) if a.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
