"""The machinery behind the reproduction scripts of this folder (hassod.py, pseudo_labels.py).

A script builds a list of `Stage`s from its arguments. Each stage is one or more commands of
our command line (`python -m hassod_jax.main --config configs/X.py --workdir D ...`) or a small
in-script step, with the inputs it reads, the outputs that mark it done and a status line
(done / resumes / to run). `--dry-run` checks every input, checkpoint and output location and
prints the plan without running anything; otherwise the stages run in order, each skipped when
its outputs are there, each resuming where it stopped (the modes resume themselves: discovery
keeps its chunks, training and Mean Teacher restore their newest checkpoints), so rerunning the
same command after a failure or a kill continues the chain.

Parallelism (`--gpus N --hosts H --host-index I --launcher local|distributed`):
- stage 1 (discovery) with `--launcher local`: N independent jobs per host, one per
  accelerator (CUDA_VISIBLE_DEVICES=i on GPUs), job index I*N+i of H*N, then host 0 merges
  the shards once all are committed (it waits up to --wait seconds for other hosts);
- with `--launcher distributed` (a TPU pod slice, or GPU hosts under SLURM / Open MPI): one
  process per host that uses all its local devices; `jax.distributed` is set up from the
  cluster's environment by our modes (hassod_jax.parallel; on GPU hosts set --coordinator,
  exported as JAX_COORDINATOR_ADDRESS); discovery shards over the processes itself;
- training and Mean Teacher: one process per host over all its local devices (H > 1 needs
  the distributed launcher); the global batch must split over H*N devices;
- ground truth, prediction, evaluation and the table: host 0 only; the other hosts wait up to
  --wait seconds for inputs that host 0 makes.
Every host must see the same --work folder (a shared file system) when H > 1.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIGS = os.path.join(REPO, "configs")
# What makes our modes start jax.distributed (hassod_jax.parallel._DISTRIBUTED_ENV).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# The published numbers (Cao et al., NeurIPS 2023; x100, class-agnostic, 1000 detections per
# image).
PAPER_MAIN = {
    "objects365": {"Box AR": 39.0, "Box AP": 11.0, "Mask AR": None, "Mask AP": None},
    "lvis": {"Box AR": 26.9, "Box AP": 4.9, "Mask AR": 22.5, "Mask AP": 4.2},
    "sa1b": {"Box AR": 29.0, "Box AP": 15.5, "Mask AR": 26.0, "Mask AP": 13.8},
}
# COCO+LVIS val ablations (Mask AR / Mask AP).
PAPER_DETECTOR_ABLATION = {
    "plain": (20.2, 5.7),
    "+ level head": (20.6, 6.1),
    "+ Mean Teacher": (22.1, 5.5),
    "+ adaptive targets": (22.4, 6.3),
}
# Pseudo-labels on COCO+LVIS val (Mask AR / Mask AP, labels per image).
PAPER_PSEUDO_LABELS = {
    "0.1": (4.1, 1.8, 2.58),
    "0.2": (5.3, 1.8, 4.20),
    "0.4": (7.8, 1.3, 11.61),
    "ensemble": (8.9, 1.7, 12.69),
}
BENCHMARK_NAMES = {
    "coco_lvis": "COCO+LVIS val2017",
    "lvis": "LVIS v1 val",
    "objects365": "Objects365 v2 val",
    "sa1b": "SA-1B (sa_000000)",
}
# The recall the table reports as "AR": at 1000 detections per image (the paper's setting).
AR_KEY = "AR@1000"

# The toy preset (`--toy`): the chain's real commands at CPU size (the small detector and
# the weight-free stand-in backbone), for a run on generated scenes (toy_run.py).
TOY_OVERRIDES = {
    "discover": {
        "backbone": "standin",
        "image_size": 160,
        "num_workers": 0,
        "max_pictures": 0,
        "chunk_size": 4,
        "batch_size": 4,
    },
    "predict": {
        "short_edge": 96,
        "max_size": 128,
        "buckets": "((96,128),(128,96),(128,128))",
        "detections": 100,
        "max_pictures": 0,
    },
}


# The toy preset's own config files for the stages whose small-model fields the COCO configs
# do not have (their `model` dicts are locked to a few keys).
TOY_CONFIGS = {
    "train": os.path.join(HERE, "toy_configs", "train.py"),
    "mean_teacher": os.path.join(HERE, "toy_configs", "mean_teacher.py"),
}


def config_for(args, stage_kind, default):
    """The config file of a stage: configs/<default>, or the toy preset's."""
    if args.toy and stage_kind in TOY_CONFIGS:
        return TOY_CONFIGS[stage_kind]
    return os.path.join(CONFIGS, default)


def config_value(config_path, field, fields=None):
    """The value of `field` (dotted) that a run of `config_path` with `fields` overrides gets:
    the override parsed as the command line would, else the config file's own value."""
    import ast
    import importlib.util

    fields = fields or {}
    if field in fields:
        v = fields[field]
        if isinstance(v, str):
            try:
                return ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v
        return v
    sys.path.insert(0, REPO)
    try:
        spec = importlib.util.spec_from_file_location("reproduce_config", config_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        node = module.get_config()
    finally:
        sys.path.remove(REPO)
    for part in field.split("."):
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------
# Stages.


@dataclasses.dataclass
class Input:
    """Something a stage reads: `kind` 'file', 'dir', 'images' (a folder holding image files)
    or 'checkpoint'; `produced_by` names the stage that writes it (then it may be missing
    before the run, as long as that stage is in the plan)."""

    label: str
    path: str
    kind: str = "file"
    produced_by: str | None = None


@dataclasses.dataclass
class Stage:
    name: str
    what: str
    commands: list = dataclasses.field(default_factory=list)  # [(argv, env extras)]
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)  # all present = done
    workdir: str = ""
    python: object = None  # an in-script step: a callable run instead of commands
    host0_only: bool = False
    status: object = None  # callable -> status line; default from the outputs
    warnings: list = dataclasses.field(default_factory=list)
    waits_for: list = dataclasses.field(default_factory=list)  # made by other jobs or hosts

    def done(self):
        return bool(self.outputs) and all(os.path.exists(p) for p in self.outputs)

    def status_line(self):
        if self.done():
            return "done"
        if self.status is not None:
            return self.status()
        return "to run"


def python_cmd():
    return [sys.executable]


def mode_cmd(config, workdir, fields, mode_module="hassod_jax.main"):
    """`python -m hassod_jax.main --config configs/<config> --workdir W --config.k=v ...`."""
    argv = python_cmd() + ["-m", mode_module, "--config", os.path.join(CONFIGS, config)]
    argv += ["--workdir", workdir]
    for k, v in fields.items():
        argv.append(f"--config.{k}={v}")
    return argv


def with_overrides(args, stage_kind, fields):
    """`fields` with the --toy preset's and the --set overrides for `stage_kind` applied."""
    out = dict(fields)
    if args.toy:
        out.update(TOY_OVERRIDES.get(stage_kind, {}))
    for item in args.set or ():
        kind, _, rest = item.partition(":")
        key, _, value = rest.partition("=")
        if kind == stage_kind:
            out[key] = value
    return out


def checkpoint_step(workdir):
    """The newest orbax step under W/checkpoints (0 when none)."""
    steps = []
    for p in glob.glob(os.path.join(workdir, "checkpoints", "*")):
        name = os.path.basename(p)
        if name.isdigit() and os.path.isdir(p):
            steps.append(int(name))
    return max(steps, default=0)


def discovery_status(out_dir):
    chunks = glob.glob(os.path.join(out_dir, "work", "shard_*", "chunk_*.json"))
    done = glob.glob(os.path.join(out_dir, "work", "shard_*", "done.json"))
    if chunks or done:
        return f"resumes: {len(chunks)} chunk(s) committed, {len(done)} shard(s) finished"
    return "to run"


# ----------------------------------------------------------------------------------------------
# Arguments shared by the scripts.


def add_common_arguments(p):
    p.add_argument("--work", required=True, help="root folder of every output of the chain")
    p.add_argument("--gpus", type=int, default=1, help="accelerators per host (GPUs or chips)")
    p.add_argument("--hosts", type=int, default=1, help="hosts taking part")
    p.add_argument("--host-index", type=int, default=0, help="this host's index, 0..hosts-1")
    p.add_argument(
        "--launcher",
        choices=("local", "distributed"),
        default="local",
        help="local: per-accelerator discovery jobs on each host; distributed: one process per "
        "host, jax.distributed from the cluster's environment (TPU pod slices, SLURM, MPI)",
    )
    p.add_argument("--kind", choices=("gpu", "tpu", "cpu"), default="gpu")
    p.add_argument(
        "--coordinator",
        default="",
        help="host:port exported as "
        "JAX_COORDINATOR_ADDRESS for the distributed launcher on GPU hosts",
    )
    p.add_argument(
        "--cpus-per-job",
        type=int,
        default=0,
        help="discovery decode/CRF workers per job (0: the cores / jobs, less one)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="wait up to this many seconds for inputs that other jobs or hosts make (host 0's "
        "merge: every shard; the other hosts: host 0's merged pseudo-labels)",
    )
    p.add_argument("--stages", default="", help="comma-separated stage names to run (default all)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check inputs, checkpoints and output locations; print the plan; run nothing",
    )
    p.add_argument(
        "--toy",
        action="store_true",
        help="CPU-sized settings (stand-in backbone, small detector, a few steps)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE:FIELD=VALUE",
        help="override a config field of a stage kind (discover, train, mean_teacher, "
        "predict, evaluate, prepare_gt), e.g. train:max_iter=20000; repeatable",
    )
    return p


def check_parallel(args, problems):
    if args.gpus < 1 or args.hosts < 1:
        problems.append("--gpus and --hosts must be at least 1")
    if not 0 <= args.host_index < args.hosts:
        problems.append(f"--host-index {args.host_index} is not in 0..{args.hosts - 1}")
    if args.kind == "tpu" and args.launcher == "local" and args.gpus > 1:
        problems.append(
            "--kind tpu: use --launcher distributed (one process per host over all its chips); "
            "per-chip jobs are for GPUs"
        )


def devices(args):
    return args.gpus * args.hosts


def check_batch(args, problems, name, batch):
    n = devices(args)
    if batch % n:
        problems.append(
            f"{name}: the global batch {batch} does not split over {n} devices "
            f"({args.hosts} host(s) x {args.gpus}); set it with --set (e.g. a multiple of {n})"
        )


def host_env(args, single_process=False):
    """Environment additions of a stage's commands (a None value removes the variable).
    single_process: a host-0-only stage, kept out of jax.distributed (the other hosts do not
    run it, so a distributed start-up would wait for them)."""
    env = {}
    if single_process:
        env.update({k: None for k in DISTRIBUTED_ENV})
    elif args.launcher == "distributed" and args.coordinator:
        env["JAX_COORDINATOR_ADDRESS"] = args.coordinator
    if args.kind == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def command_env(env):
    """os.environ with a stage's additions and removals."""
    out = dict(os.environ)
    for k, v in env.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Stage builders shared by the scripts.


def prepare_gt_stage(args, name, fmt, out, fields, inputs):
    fields = with_overrides(args, "prepare_gt", {"format": fmt, "output": out, **fields})
    workdir = os.path.join(os.path.dirname(out), "logs_" + name)
    return Stage(
        name=name,
        what=f"class-agnostic ground truth ({fmt}) -> {out}",
        commands=[(mode_cmd("prepare_gt.py", workdir, fields), host_env(args, True))],
        inputs=inputs,
        outputs=[out, out[:-5] + ".summary.json"],
        workdir=workdir,
        host0_only=True,
    )


def discovery_stages(args, name, workdir, images, image_list, fields, list_input):
    """Discovery of `image_list` (a COCO JSON of file names relative to `images`) sharded as
    the launcher says, then (local launcher, more than one job) host 0's merge."""
    base = {"images": images, "coco_json": image_list, **fields}
    out_dir = os.path.join(workdir, "pseudo_labels")
    ensemble = os.path.join(out_dir, "pseudo_labels_hier.json")
    env = host_env(args)
    stages = []
    if args.launcher == "distributed":
        f = with_overrides(args, "discover", base)
        stages.append(
            Stage(
                name=name,
                what="stage 1 discovery, one process per host over its local devices "
                f"({args.hosts} host(s)), assembled by process 0",
                commands=[(mode_cmd("discover_coco.py", workdir, f), env)],
                inputs=[list_input],
                outputs=[ensemble],
                workdir=workdir,
                status=lambda: discovery_status(out_dir),
            )
        )
        return stages
    jobs = args.gpus * args.hosts
    commands = []
    workers = args.cpus_per_job or max((os.cpu_count() or 2) // args.gpus - 1, 0)
    for i in range(args.gpus):
        job = args.host_index * args.gpus + i
        f = with_overrides(args, "discover", dict(base, job_index=job, num_jobs=jobs))
        f.setdefault("num_workers", workers)
        job_env = dict(env)
        if args.kind == "gpu":
            job_env["CUDA_VISIBLE_DEVICES"] = str(i)
        commands.append((mode_cmd("discover_coco.py", workdir, f), job_env))
    shard_done = [
        os.path.join(out_dir, "work", f"shard_{s:04d}_of_{jobs:04d}", "done.json")
        for s in range(args.host_index * args.gpus, (args.host_index + 1) * args.gpus)
    ]
    stages.append(
        Stage(
            name=name,
            what=f"stage 1 discovery: {args.gpus} job(s) on this host, jobs "
            f"{args.host_index * args.gpus}..{(args.host_index + 1) * args.gpus - 1} of {jobs}",
            commands=commands,
            inputs=[list_input],
            outputs=[ensemble] if jobs == 1 else shard_done,
            workdir=workdir,
            status=lambda: discovery_status(out_dir),
        )
    )
    if jobs > 1:
        merge_fields = with_overrides(args, "discover", {"images": images, **fields})
        merge_fields = {k: v for k, v in merge_fields.items() if k in ("thresholds",)}
        stages.append(
            Stage(
                name=name + "_merge",
                what=f"join the {jobs} discovery shards into {ensemble}",
                commands=[
                    (
                        mode_cmd("merge_pseudo_labels.py", workdir, merge_fields),
                        host_env(args, True),
                    )
                ],
                inputs=[
                    Input(
                        "discovery shards", os.path.join(out_dir, "work"), "dir", produced_by=name
                    )
                ],
                outputs=[ensemble],
                workdir=workdir,
                host0_only=True,
                status=lambda: _shards_status(out_dir, jobs),
                waits_for=[
                    os.path.join(out_dir, "work", f"shard_{k:04d}_of_{jobs:04d}", "done.json")
                    for k in range(jobs)
                ],
            )
        )
    return stages


def _shards_status(out_dir, jobs):
    done = [
        s
        for s in range(jobs)
        if os.path.exists(
            os.path.join(out_dir, "work", f"shard_{s:04d}_of_{jobs:04d}", "done.json")
        )
    ]
    return f"waits for shards: {len(done)} of {jobs} finished"


def predict_stage(
    args, name, checkpoint, gt_json, image_dir, workdir, produced_by, gt_stage, warnings=()
):
    fields = with_overrides(
        args,
        "predict",
        {
            "checkpoint": checkpoint,
            "images": gt_json,
            "image_dir": image_dir,
            "score_threshold": 0.0,
            "detections": 1000,
            "max_pictures": 0,
        },
    )
    return Stage(
        name=name,
        what=f"detections (score > 0, up to {fields['detections']} per image) on {gt_json}",
        commands=[(mode_cmd("predict.py", workdir, fields), host_env(args, True))],
        inputs=[
            Input("detector", checkpoint, "checkpoint", produced_by=produced_by),
            Input("ground truth (image list)", gt_json, "file", produced_by=gt_stage),
            Input("images", image_dir, "images"),
        ],
        outputs=[os.path.join(workdir, "predictions.json")],
        workdir=workdir,
        host0_only=True,
        warnings=list(warnings),
    )


def evaluate_stage(
    args, name, gt_json, predictions, workdir, produced_by, gt_stage, iou_types=("bbox", "segm")
):
    fields = with_overrides(
        args,
        "evaluate",
        {
            "gt_json": gt_json,
            "predictions_json": predictions,
            "iou_types": "(" + ",".join(repr(t) for t in iou_types) + ",)",
        },
    )
    return Stage(
        name=name,
        what=f"class-agnostic COCO AP/AR ({', '.join(iou_types)}) -> {workdir}/eval.json",
        commands=[(mode_cmd("evaluate.py", workdir, fields), host_env(args, True))],
        inputs=[
            Input("ground truth", gt_json, "file", produced_by=gt_stage),
            Input("predictions", predictions, "file", produced_by=produced_by),
        ],
        outputs=[os.path.join(workdir, "eval.json")],
        workdir=workdir,
        host0_only=True,
    )


# ----------------------------------------------------------------------------------------------
# The image list of stage 1.


def write_image_list(root, folders, out):
    """A COCO image list (file names relative to `root`) of every image file directly in
    root/<folder> for each folder, in folder then name order. Ids are the numeric stems (COCO's
    000000123456.jpg -> 123456) when they are unique across folders, else 1..N in order.
    Written atomically; returns the number of images."""
    sys.path.insert(0, REPO)
    try:
        from hassod_jax import utils
    finally:
        sys.path.pop(0)
    names = []
    for folder in folders:
        d = os.path.join(root, folder)
        names += [
            f"{folder}/{n}"
            for n in sorted(os.listdir(d))
            if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
        ]
    stems = [os.path.splitext(os.path.basename(n))[0] for n in names]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        ids = [int(s) for s in stems]
    else:
        ids = list(range(1, len(names) + 1))
    images = [{"id": i, "file_name": n} for i, n in zip(ids, names)]
    utils.atomic_write_json(
        out,
        {
            "images": images,
            "annotations": [],
            "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}],
        },
    )
    return len(images)


# ----------------------------------------------------------------------------------------------
# Checks and the plan.


def _has_images(path, limit=2000):
    try:
        with os.scandir(path) as it:
            for k, entry in enumerate(it):
                if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    return True
                if entry.is_dir() and k < 50 and _has_images(entry.path, 200):
                    return True
                if k >= limit:
                    break
    except OSError:
        return False
    return False


def _writable(path):
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent
    return os.path.isdir(p) and os.access(p, os.W_OK | os.X_OK)


def check_input(inp, planned):
    """'' when fine, else the problem. planned: names of the stages that will run."""
    if not inp.path:
        return f"{inp.label}: no path given"
    exists = os.path.exists(inp.path)
    if not exists:
        if inp.produced_by and inp.produced_by in planned:
            return ""
        if inp.produced_by:
            return (
                f"{inp.label}: {inp.path} is missing and stage {inp.produced_by}, which "
                "writes it, is not selected"
            )
        return f"{inp.label}: {inp.path} does not exist"
    if inp.kind == "file" and not os.path.isfile(inp.path):
        return f"{inp.label}: {inp.path} is not a file"
    if inp.kind in ("dir", "images") and not os.path.isdir(inp.path):
        return f"{inp.label}: {inp.path} is not a folder"
    if inp.kind == "images" and not _has_images(inp.path):
        return f"{inp.label}: {inp.path} holds no image files"
    if inp.kind == "file" and os.path.getsize(inp.path) == 0 and not inp.produced_by:
        return f"{inp.label}: {inp.path} is empty"
    if inp.kind == "checkpoint" and os.path.isfile(inp.path):
        with open(inp.path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            return (
                f"{inp.label}: {inp.path} is neither a torch zip archive nor a pickle "
                "(the first bytes say so; the dry run does not load it)"
            )
    if inp.kind == "checkpoint" and os.path.isdir(inp.path) and not os.listdir(inp.path):
        return f"{inp.label}: {inp.path} is an empty folder"
    return ""


def input_state(inp, planned):
    if os.path.exists(inp.path):
        return "ok"
    if inp.produced_by and inp.produced_by in planned:
        return f"from {inp.produced_by}"
    return "MISSING"


def select(stages, names):
    if not names:
        return stages
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name for s in stages}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(
            f"error: unknown stage(s) {', '.join(unknown)}; the stages are: "
            f"{', '.join(s.name for s in stages)}"
        )
    return [s for s in stages if s.name in wanted]


def for_this_host(stages, args):
    return [s for s in stages if not (s.host0_only and args.host_index != 0)]


def check(stages, planned, problems):
    """Appends every problem of the plan to `problems` (planned: the names of the stages any
    host runs)."""
    for s in stages:
        if s.done():
            continue
        for inp in s.inputs:
            why = check_input(inp, planned)
            if why:
                problems.append(f"{s.name}: {why}")
        for out in s.outputs + ([s.workdir] if s.workdir else []):
            if not _writable(out):
                problems.append(f"{s.name}: cannot write {out} (no writable folder above it)")
    return problems


def quote(arg):
    """A shell word for `arg`, in double quotes where it holds single quotes only (readable
    config tuples such as "--config.iou_types=('bbox',)")."""
    q = shlex.quote(arg)
    if q != arg and "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return q


def shell_line(argv, env=None):
    env = env or {}
    unset = [k for k, v in env.items() if v is None]
    prefix = ("env " + " ".join(f"-u {k}" for k in unset) + " ") if unset else ""
    prefix += " ".join(f"{k}={quote(v)}" for k, v in env.items() if v is not None)
    return (prefix.rstrip() + " " if prefix else "") + " ".join(quote(a) for a in argv)


def describe(stages, args, title, problems, planned, out=None):
    out = out or sys.stdout
    print(f"{title}", file=out)
    print(
        f"host {args.host_index} of {args.hosts}, {args.gpus} {args.kind} device(s) per host, "
        f"launcher {args.launcher}{', toy settings' if args.toy else ''}; work {args.work}",
        file=out,
    )
    for k, s in enumerate(stages, 1):
        print(f"\n[{k}] {s.name}: {s.what}", file=out)
        print(f"    status: {s.status_line()}", file=out)
        for inp in s.inputs:
            print(f"    in  [{input_state(inp, planned)}] {inp.label}: {inp.path}", file=out)
        for o in s.outputs:
            print(f"    out [{'exists' if os.path.exists(o) else 'to write'}] {o}", file=out)
        for w in s.warnings:
            print(f"    warning: {w}", file=out)
        if s.python is not None:
            print("    runs: (in this script)", file=out)
        for argv, env in s.commands:
            print(f"    $ {shell_line(argv, env)}", file=out)
    print("", file=out)
    if problems:
        print(f"{len(problems)} problem(s):", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
    else:
        print(
            "no problems found: every input is there or made by an earlier stage, and every "
            "output location is writable",
            file=out,
        )


def run_stage(stage, args, log=print):
    """Runs one stage's commands (in parallel when several), or its in-script step."""
    if stage.done():
        log(f"[{stage.name}] done already ({', '.join(stage.outputs)})")
        return 0
    log(f"[{stage.name}] {stage.what} ({stage.status_line()})")
    if stage.python is not None:
        stage.python()
        return 0
    procs = []
    for argv, env in stage.commands:
        full_env = command_env(env)
        log("  $ " + shell_line(argv, env))
        procs.append(subprocess.Popen(argv, cwd=REPO, env=full_env))
    codes = [p.wait() for p in procs]
    bad = [c for c in codes if c != 0]
    if bad:
        log(
            f"[{stage.name}] failed (exit code {bad[0]}); fix the cause and rerun the same "
            "command: finished stages are skipped and this one resumes"
        )
        return bad[0]
    return 0


def wait_for(paths, seconds, log=print):
    deadline = time.time() + seconds
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing or time.time() >= deadline:
            return missing
        log(f"waiting for {len(missing)} shard(s) of other hosts ...")
        time.sleep(min(60.0, max(deadline - time.time(), 0.1)))


def main_flow(args, stages, title, problems=()):
    """Dry run or run. `problems`: the script's own findings (missing arguments, ...).
    Returns the exit code: 0, 2 when problems were found, or a failed stage's code."""
    selected = select(stages, args.stages)
    planned = {s.name for s in selected}  # by any host: host 0's stages feed the others
    stages = for_this_host(selected, args)
    problems = list(problems)
    check_parallel(args, problems)
    check(stages, planned, problems)
    if args.dry_run:
        describe(stages, args, title, problems, planned)
        return 2 if problems else 0
    if problems:
        describe(stages, args, title, problems, planned, out=sys.stderr)
        return 2
    for s in stages:
        if not s.done():
            need = list(s.waits_for) + [
                i.path for i in s.inputs if i.produced_by and not os.path.exists(i.path)
            ]
            missing = wait_for(need, args.wait) if need else []
            if missing:
                print(
                    f"[{s.name}] waited {args.wait:g} s; still missing (made by earlier stages, "
                    f"other jobs or host 0): {', '.join(missing[:4])}"
                    + (" ..." if len(missing) > 4 else "")
                    + "; rerun later, or pass --wait SECONDS",
                    file=sys.stderr,
                )
                return 2
        code = run_stage(s, args)
        if code:
            return code
    return 0


# ----------------------------------------------------------------------------------------------
# The table.


def read_eval(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def metric(ev, iou_type, key):
    """x100, or None when missing / skipped / undefined (-1)."""
    if ev is None or iou_type not in ev or "skipped" in ev[iou_type]:
        return None
    v = ev[iou_type].get(key)
    if v is None or v < 0:
        return None
    return round(100.0 * float(v), 1)


def cell(ours, paper):
    a = "–" if ours is None else f"{ours:.1f}"
    b = "–" if paper is None else f"{paper:.1f}"
    return f"{a} ({b})"
