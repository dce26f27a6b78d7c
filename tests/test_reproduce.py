"""tools/reproduce: the dry runs of the reproduction scripts on a generated tree of the
official layouts (every input, checkpoint and output location checked, the plan printed, the
sharding for 1 GPU, an 8-GPU node, several hosts and a TPU pod slice), stages that run, skip
and resume, the table in the paper's layout, and plan.py's figures read from RESULTS.md; and
the whole toy chain (tools/reproduce/toy_run.py --ablations) run for real, about 3
minutes on 2 cores, almost all of it XLA compiles and process start-ups."""

import importlib.util
import json
import os
import shutil
import sys

import pytest

from tests.xla_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPRO = os.path.join(ROOT, "tools", "reproduce")
RESULTS = os.path.join(ROOT, "experiments", "RESULTS.md")


def _load(name):
    if REPRO not in sys.path:
        sys.path.insert(0, REPRO)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPRO, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


chain = _load("chain")
fake_tree = _load("fake_tree")
hassod = _load("hassod")
pseudo_labels = _load("pseudo_labels")
plan = _load("plan")
toy_run = _load("toy_run")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    fake_tree.write_tree(str(root), train=2, unlabeled=1, val=2, objects365=1, sa1b=2)
    return str(root)


def _dry(module, argv, capsys):
    code = module.main(argv + ["--dry-run"])
    return code, capsys.readouterr().out


def _stage_block(out, name):
    """The lines of one stage in a dry run's output."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if f"] {name}:" in ln)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return "\n".join(lines[start:end])


def test_generated_tree_has_the_official_layouts(tree):
    p = fake_tree.paths(tree)
    with open(os.path.join(p["coco"], "annotations", "instances_val2017.json")) as f:
        coco = json.load(f)
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(coco)
    assert all(isinstance(a["segmentation"], list) for a in coco["annotations"] if not a["iscrowd"])
    assert any(
        a["iscrowd"] and isinstance(a["segmentation"]["counts"], list) for a in coco["annotations"]
    )
    with open(p["lvis"]) as f:
        lvis = json.load(f)
    assert all("file_name" not in im and "coco_url" in im for im in lvis["images"])
    assert all("iscrowd" not in a for a in lvis["annotations"])
    assert {"not_exhaustive_category_ids", "neg_category_ids"} <= set(lvis["images"][0])
    with open(p["objects365_json"]) as f:
        o365 = json.load(f)
    name = o365["images"][0]["file_name"]
    assert name.startswith("images/v1/patch0/")
    assert os.path.exists(os.path.join(p["objects365_images"], name))
    with open(os.path.join(p["sa1b"], "sa_1.json")) as f:
        sa = json.load(f)
    assert set(sa) == {"image", "annotations"}
    assert isinstance(sa["annotations"][0]["segmentation"]["counts"], str)


def test_hassod_dry_run_one_gpu(tree, tmp_path, capsys):
    code, out = _dry(hassod, ["--work", str(tmp_path / "w")] + fake_tree.script_args(tree), capsys)
    assert code == 0, out
    names = [
        "gt_coco_lvis",
        "gt_lvis",
        "gt_objects365",
        "gt_sa1b",
        "stage1_list",
        "discover",
        "train",
        "mean_teacher",
        "predict_stage2_coco_lvis",
        "evaluate_stage2_coco_lvis",
    ]
    names += [f"{k}_final_{b}" for b in hassod.BENCHMARKS for k in ("predict", "evaluate")]
    names += ["table"]
    for n in names:
        assert f"] {n}:" in out, n
    assert "discover_merge" not in out  # one job assembles its own files
    assert "no problems found" in out
    w = str(tmp_path / "w")
    block = _stage_block(out, "discover")
    assert "CUDA_VISIBLE_DEVICES=0" in block and "--config.num_jobs=1" in block
    assert f"--config.coco_json={w}/stage1/image_list.json" in block
    assert "in  [from stage1_list]" in block
    assert "--config.lvis_file_name=split" in _stage_block(out, "gt_lvis")
    assert "--config.iou_types=('bbox',)" in _stage_block(out, "evaluate_final_objects365")
    assert "boxes-only" in _stage_block(out, "predict_final_objects365")  # the size warning
    block = _stage_block(out, "predict_final_lvis")
    assert f"--config.checkpoint={w}/mean_teacher/model_final" in block
    assert "--config.score_threshold=0.0" in block and "--config.detections=1000" in block
    assert f"--config.checkpoint={w}/train " in _stage_block(out, "predict_stage2_coco_lvis")
    assert f"{w}/train/checkpoints/40000" in _stage_block(out, "train")
    assert "--config.resnet_checkpoint=" in _stage_block(out, "train")
    assert "train_plain" not in out and "mean_teacher_constant" not in out
    assert not os.path.exists(w)  # a dry run writes nothing
    # --ablations: the "plain" and "+ Mean Teacher" rows' own runs and their evaluations.
    code, out = _dry(
        hassod, ["--work", w, "--ablations"] + fake_tree.script_args(tree), capsys
    )
    assert code == 0, out
    block = _stage_block(out, "train_plain")
    assert "--config.model.level_loss_weight=0.0" in block
    assert f"{w}/ablation_plain/checkpoints/40000" in block
    block = _stage_block(out, "mean_teacher_constant")
    assert "--config.loss_weights=constant" in block
    assert f"--config.init_checkpoint={w}/train " in block and "in  [from train]" in block
    assert f"--config.checkpoint={w}/ablation_plain " in _stage_block(
        out, "predict_plain_coco_lvis"
    )
    block = _stage_block(out, "predict_mt_constant_coco_lvis")
    assert f"--config.checkpoint={w}/ablation_mean_teacher_constant/model_final" in block
    assert "] evaluate_mt_constant_coco_lvis:" in out and "no problems found" in out
    assert not os.path.exists(w)


def test_hassod_dry_run_8_gpus_and_two_hosts(tree, tmp_path, capsys):
    args = ["--work", str(tmp_path / "w")] + fake_tree.script_args(tree)
    code, out = _dry(hassod, args + ["--gpus", "8"], capsys)
    assert code == 0, out
    block = _stage_block(out, "discover")
    for i in range(8):
        assert f"CUDA_VISIBLE_DEVICES={i} " in block
        assert f"--config.job_index={i} --config.num_jobs=8" in block
    assert "] discover_merge:" in out
    assert "merge_pseudo_labels.py" in _stage_block(out, "discover_merge")

    # host 1 of 2, per-GPU discovery jobs: its 8 jobs are 8..15 of 16; host-0-only stages
    # are not its business; training across hosts needs the distributed launcher
    two = ["--gpus", "8", "--hosts", "2", "--host-index", "1"]
    code, out = _dry(hassod, args + two, capsys)
    assert code == 2
    block = _stage_block(out, "discover")
    assert "--config.job_index=8 --config.num_jobs=16" in block
    assert "--config.job_index=15 --config.num_jobs=16" in block
    for n in ("gt_lvis", "discover_merge", "predict_final_lvis", "table"):
        assert f"] {n}:" not in out
    assert "train / mean_teacher over several hosts need --launcher distributed" in out
    code, out = _dry(
        hassod, args + two + ["--stages", "stage1_list,discover,discover_merge"], capsys
    )
    assert code == 0, out
    # the distributed launcher: one process per host; Mean Teacher's 8 + 8 do not split over
    # 16 devices until set to 16 + 16
    dist = two + ["--launcher", "distributed"]
    code, out = _dry(hassod, args + dist, capsys)
    assert code == 2
    assert "mean_teacher batch_size_label: the global batch 8 does not split over 16" in out
    assert "] train:" in out and "] mean_teacher:" in out
    mt = [
        "--set",
        "mean_teacher:batch_size_label=16",
        "--set",
        "mean_teacher:batch_size_unlabel=16",
    ]
    code, out = _dry(hassod, args + dist + mt, capsys)
    assert code == 0, out
    assert "--config.batch_size_label=16" in _stage_block(out, "mean_teacher")
    assert _stage_block(out, "discover").count("$ ") == 1


def test_hassod_dry_run_tpu_pod_slice(tree, tmp_path, capsys):
    args = ["--work", str(tmp_path / "w")] + fake_tree.script_args(tree)
    args += ["--kind", "tpu", "--hosts", "4", "--gpus", "4"]
    code, out = _dry(hassod, args + ["--launcher", "local"], capsys)
    assert code == 2 and "use --launcher distributed" in out
    mt = [
        "--set",
        "mean_teacher:batch_size_label=16",
        "--set",
        "mean_teacher:batch_size_unlabel=16",
    ]
    code, out = _dry(hassod, args + ["--launcher", "distributed"] + mt, capsys)
    assert code == 0, out
    block = _stage_block(out, "discover")
    assert block.count("$ ") == 1 and "--config.num_jobs" not in block
    assert "one process per host" in block and "] discover_merge:" not in out
    assert "CUDA_VISIBLE_DEVICES" not in out
    code, out = _dry(
        hassod, args + ["--launcher", "distributed", "--coordinator", "10.0.0.1:1234"] + mt, capsys
    )
    assert "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234" in _stage_block(out, "train")
    # host 0's own stages stay out of jax.distributed: the other hosts do not run them
    from hassod_jax import parallel

    assert chain.DISTRIBUTED_ENV == parallel._DISTRIBUTED_ENV
    unset = " ".join(f"-u {k}" for k in parallel._DISTRIBUTED_ENV)
    for name in ("predict_final_lvis", "evaluate_final_lvis", "gt_lvis"):
        block = _stage_block(out, name)
        assert f"$ env {unset} " in block and "=10.0.0.1:1234" not in block
    env = chain.command_env({"JAX_COORDINATOR_ADDRESS": None, "X_TEST": "1"})
    assert env["X_TEST"] == "1" and "JAX_COORDINATOR_ADDRESS" not in env


def test_dry_run_names_every_missing_or_broken_input(tree, tmp_path, capsys):
    broken = tmp_path / "official"
    shutil.copytree(tree, broken)
    p = fake_tree.paths(str(broken))
    os.remove(p["lvis"])
    with open(p["dino_resnet"], "w") as f:
        f.write("not a checkpoint")
    shutil.rmtree(os.path.join(p["coco"], "unlabeled2017"))
    os.makedirs(os.path.join(p["coco"], "unlabeled2017"))  # empty: no images
    code, out = _dry(
        hassod, ["--work", str(tmp_path / "w")] + fake_tree.script_args(str(broken)), capsys
    )
    assert code == 2
    problems = out.split("problem(s):")[1]
    assert f"gt_coco_lvis: LVIS v1 val: {p['lvis']} does not exist" in problems
    assert f"gt_lvis: LVIS v1 val: {p['lvis']} does not exist" in problems
    assert f"{p['dino_resnet']} is neither a torch zip archive nor a pickle" in problems
    assert "unlabeled2017 holds no image files" in problems
    assert "in  [MISSING] LVIS v1 val" in out
    # arguments the row cannot do without, each only where a selected stage uses it
    code, out = _dry(hassod, ["--work", str(tmp_path / "w"), "--coco", p["coco"]], capsys)
    assert code == 2
    needed = (
        "--lvis lvis_v1_val.json is needed",
        "objects365: pass --objects365-json",
        "sa1b: pass --sa1b",
        "--dino-vit dino_vitbase8_pretrain.pth is needed",
        "--dino-resnet dino_resnet50_pretrain.pth is needed",
    )
    for what in needed:
        assert what in out, what
    p = fake_tree.paths(tree)  # the intact tree
    code, out = _dry(
        hassod,
        [
            "--work",
            str(tmp_path / "w"),
            "--coco",
            p["coco"],
            "--stages",
            "stage1_list,discover",
            "--dino-vit",
            p["dino_vit"],
        ],
        capsys,
    )
    assert code == 0, out
    assert not any(what in out for what in needed)


def test_status_done_resumes_and_selected_stages(tree, tmp_path, capsys):
    w = tmp_path / "w"
    args = ["--work", str(w)] + fake_tree.script_args(tree)
    gt = w / "gt"
    gt.mkdir(parents=True)
    for name in ("coco_lvis", "lvis"):
        (gt / f"{name}_cls_agnostic.json").write_text("{}")
        (gt / f"{name}_cls_agnostic.summary.json").write_text("{}")
    shard = w / "stage1" / "pseudo_labels" / "work" / "shard_0000_of_0001"
    shard.mkdir(parents=True)
    (shard / "chunk_000000.json").write_text("{}")
    (w / "train" / "checkpoints" / "2000").mkdir(parents=True)
    code, out = _dry(hassod, args, capsys)
    assert code == 0, out
    assert "status: done" in _stage_block(out, "gt_coco_lvis")
    assert "status: to run" in _stage_block(out, "gt_sa1b")
    assert "resumes: 1 chunk(s) committed" in _stage_block(out, "discover")
    assert "resumes at step 2000 of 40000" in _stage_block(out, "train")
    # a stage alone: its inputs must exist, or be made by a selected stage
    code, out = _dry(hassod, args + ["--stages", "train"], capsys)
    assert code == 2
    assert (
        "train: pseudo-labels:" in out and "stage discover, which writes it, is not selected" in out
    )
    code, out = _dry(hassod, args + ["--stages", "stage1_list,discover,train"], capsys)
    assert code == 0, out
    with pytest.raises(SystemExit, match="unknown stage"):
        hassod.main(args + ["--stages", "trian", "--dry-run"])


def test_stages_run_and_skip(tree, tmp_path, capsys):
    """Not a dry run: a ground-truth stage (prepare_gt as a subprocess, our command line) and
    the image list run; a rerun skips them."""
    w = tmp_path / "w"
    args = ["--work", str(w)] + fake_tree.script_args(tree)
    code = hassod.main(args + ["--stages", "gt_coco_lvis,stage1_list"])
    out = capsys.readouterr().out
    assert code == 0, out
    with open(w / "gt" / "coco_lvis_cls_agnostic.summary.json") as f:
        s = json.load(f)
    assert s["shared_images"] == 2 and s["duplicates_removed"] >= 1 and s["dropped"] == {}
    with open(w / "gt" / "coco_lvis_cls_agnostic.json") as f:
        assert sorted(im["file_name"] for im in json.load(f)["images"]) == [
            "000000000100.jpg",
            "000000000101.jpg",
        ]
    with open(w / "stage1" / "image_list.json") as f:
        listed = json.load(f)["images"]
    assert [im["file_name"] for im in listed] == [
        "train2017/000000000001.jpg",
        "train2017/000000000002.jpg",
        "unlabeled2017/000000000003.jpg",
    ]
    assert [im["id"] for im in listed] == [1, 2, 3]
    code = hassod.main(args + ["--stages", "gt_coco_lvis,stage1_list"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("done already") == 2


def test_runner_parallel_jobs_failure_and_waiting(tmp_path, capsys):
    args = hassod.parse_args(["--work", str(tmp_path), "--coco", str(tmp_path)])
    outs = [str(tmp_path / f"job{k}") for k in range(2)]
    jobs = chain.Stage(
        name="jobs",
        what="two commands at once",
        commands=[
            ([sys.executable, "-c", f"open({o!r}, 'w').write('x')"], {"K": str(k)})
            for k, o in enumerate(outs)
        ],
        outputs=outs,
    )
    assert chain.run_stage(jobs, args) == 0 and jobs.done()
    assert chain.run_stage(jobs, args) == 0
    assert "done already" in capsys.readouterr().out
    bad = chain.Stage(
        name="bad",
        what="fails",
        commands=[([sys.executable, "-c", "import sys; sys.exit(3)"], {})],
        outputs=[str(tmp_path / "never")],
    )
    assert chain.run_stage(bad, args) == 3
    assert "[bad] failed (exit code 3); fix the cause and rerun" in capsys.readouterr().out
    # an input another host makes: waited for, then refused with a message
    other = chain.Stage(
        name="made_on_host0", what="", host0_only=True, outputs=[str(tmp_path / "merged.json")]
    )
    late = chain.Stage(
        name="late",
        what="",
        outputs=[str(tmp_path / "late")],
        inputs=[chain.Input("merged", str(tmp_path / "merged.json"), produced_by="made_on_host0")],
    )
    args.host_index, args.hosts, args.wait = 1, 2, 0.2
    assert chain.main_flow(args, [other, late], "t") == 2
    err = capsys.readouterr().err
    assert "[late] waited 0.2 s; still missing" in err and "merged.json" in err
    # the same plan dry-run is fine: host 0 makes the input
    args.dry_run = True
    assert chain.main_flow(args, [other, late], "t") == 0
    assert "in  [from made_on_host0] merged" in capsys.readouterr().out


def test_table_in_the_papers_layout(tree, tmp_path, capsys):
    w = tmp_path / "w"
    args = ["--work", str(w)] + fake_tree.script_args(tree)

    def ev(name, bbox, segm=None):
        d = w / "eval" / name
        d.mkdir(parents=True)
        m = {"bbox": {"AP": bbox[1], "AR@1000": bbox[0], "AR@100": bbox[0] / 2}}
        m["segm"] = (
            {"AP": segm[1], "AR@1000": segm[0], "AR@100": segm[0] / 2}
            if segm
            else {"skipped": "no masks"}
        )
        (d / "eval.json").write_text(json.dumps(m))

    ev("final_objects365", (0.391, 0.112))
    ev("final_lvis", (0.27, 0.05), (0.2254, 0.0421))
    ev("final_coco_lvis", (0.3, 0.07), (0.224, 0.063))
    ev("stage2_coco_lvis", (0.3, 0.07), (0.206, 0.061))
    code = hassod.main(args + ["--stages", "table"])
    out = capsys.readouterr().out
    assert code == 0, out
    text = (w / "table.md").read_text()
    assert "| benchmark | Box AR | Box AP | Mask AR | Mask AP |" in text
    assert "| Objects365 v2 val | 39.1 (39.0) | 11.2 (11.0) | – (–) | – (–) |" in text
    assert "| LVIS v1 val | 27.0 (26.9) | 5.0 (4.9) | 22.5 (22.5) | 4.2 (4.2) |" in text
    assert "| SA-1B (sa_000000) | – (29.0) | – (15.5) | – (26.0) | – (13.8) |" in text
    assert "| + level head | 20.6 (20.6) | 6.1 (6.1) |" in text
    assert "| + adaptive targets | 22.4 (22.4) | 6.3 (6.3) |" in text
    assert "| plain | not run (20.2) | not run (5.7) |" in text
    assert "| + Mean Teacher | not run (22.1) | not run (5.5) |" in text
    assert "plain: not run; --ablations adds it" in text
    rows = json.loads((w / "table.json").read_text())["rows"]
    assert rows["lvis"]["ours"]["Mask AR"] == 22.5 and rows["lvis"]["ours_AR@100"]["segm"] == 11.3
    assert rows["sa1b"]["evaluated"] is False
    # --ablations: the two rows with runs of their own are read from their evaluations.
    ev("plain_coco_lvis", (0.3, 0.07), (0.202, 0.057))
    code = hassod.main(args + ["--ablations", "--stages", "table"])
    assert code == 0, capsys.readouterr().out
    text = (w / "table.md").read_text()
    assert "| plain | 20.2 (20.2) | 5.7 (5.7) |" in text
    assert "| + Mean Teacher | – (22.1) | – (5.5) |" in text  # not evaluated yet
    assert "not run" not in text
    rows = json.loads((w / "table.json").read_text())["rows"]
    assert rows["plain"]["evaluated"] is True and rows["+ Mean Teacher"]["evaluated"] is False


def test_pseudo_label_rows_dry_run_and_table(tree, tmp_path, capsys):
    p = fake_tree.paths(tree)
    w = tmp_path / "w"
    args = [
        "--work",
        str(w),
        "--coco",
        p["coco"],
        "--lvis",
        p["lvis"],
        "--dino-vit",
        p["dino_vit"],
        "--gpus",
        "2",
    ]
    code, out = _dry(pseudo_labels, args, capsys)
    assert code == 0, out
    for row in ("0.1", "0.2", "0.4", "ensemble"):
        assert f"] evaluate_{row}:" in out
    block = _stage_block(out, "discover")
    assert "--config.thresholds=(0.4,0.2,0.1)" in block
    assert f"--config.coco_json={w}/gt/coco_lvis_cls_agnostic.json" in block
    assert f"--config.images={p['coco']}/val2017" in block
    assert "--config.job_index=1 --config.num_jobs=2" in block
    assert f"{w}/discover_val/pseudo_labels/thresh_0.1.json" in _stage_block(out, "evaluate_0.1")
    d = w / "eval" / "ensemble"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(
        json.dumps(
            {
                "segm": {"AP": 0.017, "AR@1000": 0.089},
                "bbox": {"AP": 0.02, "AR@1000": 0.1},
                "num_predictions": 127,
                "images": {"count": 10},
            }
        )
    )
    assert pseudo_labels.main(args + ["--stages", "table"]) == 0
    text = (w / "table.md").read_text()
    assert "| ensemble (0.1, 0.2, 0.4) | 8.9 (8.9) | 1.7 (1.7) | 12.70 (12.69) |" in text
    assert "| θ = 0.1 | – (4.1) | – (1.8) | – (2.58) |" in text


def test_toy_run_dry_run(tmp_path, capsys):
    code = toy_run.main(["--work", str(tmp_path / "toy"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--config.backbone=standin" in out and "--config.dino_checkpoint" not in out
    assert os.path.join(REPRO, "toy_configs", "train.py") in _stage_block(out, "train")
    assert "4 steps" in _stage_block(out, "train") and "4 steps" in _stage_block(
        out, "mean_teacher"
    )
    assert "--config.resnet_checkpoint" not in _stage_block(out, "train")
    assert "JAX_PLATFORMS=cpu" in _stage_block(out, "train")
    assert out.count("no problems found") == 2  # hassod.py and pseudo_labels.py


def test_image_list_ids(tmp_path):
    for folder, names in (("a", ["000000000007.jpg", "000000000003.jpg"]), ("b", ["x.png"])):
        os.makedirs(tmp_path / folder)
        for n in names:
            (tmp_path / folder / n).write_bytes(b"")
    out = str(tmp_path / "list.json")
    assert chain.write_image_list(str(tmp_path), ["a"], out) == 2
    with open(out) as f:
        assert [(im["id"], im["file_name"]) for im in json.load(f)["images"]] == [
            (3, "a/000000000003.jpg"),
            (7, "a/000000000007.jpg"),
        ]
    chain.write_image_list(str(tmp_path), ["a", "b"], out)  # a stem that is no number
    with open(out) as f:
        assert [im["id"] for im in json.load(f)["images"]] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# plan.py


def test_plan_reads_its_figures_from_results_md():
    with open(RESULTS, encoding="utf-8") as f:
        text = f.read()
    p1 = plan.plan(1, "h200")
    stages = {s["stage"].strip(): s for s in p1["stages"]}
    disc = p1["citations"]["discovery_h200"]
    assert disc["row"] in text and disc["date"] in text and disc["section"] in text
    assert stages["stage 1 discovery"]["time_s"] == pytest.approx(241_690 * disc["value"])
    train = p1["citations"]["train_h200"]
    assert train["row"] in text
    assert stages["stage 2.2 training"]["time_s"] == pytest.approx(640_000 / train["value"])
    assert stages["stage 2.3 Mean Teacher"]["time_s"] is None  # no figure: not guessed
    assert "predict LVIS v1 val" in p1["missing"]
    p8 = plan.plan(8, "h200")
    s8 = {s["stage"].strip(): s for s in p8["stages"]}
    assert s8["stage 1 discovery"]["time_s"] == pytest.approx(
        stages["stage 1 discovery"]["time_s"] / 8
    )
    cpu = plan.plan(1, "cpu")
    c = {s["stage"].strip(): s for s in cpu["stages"]}
    assert c["stage 2.2 training"]["bound"] == "lower bound"
    assert cpu["citations"]["discovery_cpu"]["row"] in text
    out = plan.render(p1)
    assert "[1] " + disc["date"] in out and "not measured" in out and "20 h on 4xA100" in out


def test_plan_says_missing_when_results_md_lacks_a_figure(tmp_path):
    with open(RESULTS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = [ln for ln in lines if not (ln.startswith("| H200 (16 CPU workers)"))]
    assert len(kept) < len(lines)
    path = tmp_path / "RESULTS.md"
    path.write_text("\n".join(kept) + "\n")
    p = plan.plan(1, "h200", str(path))
    stages = {s["stage"].strip(): s for s in p["stages"]}
    assert stages["stage 1 discovery"]["time_s"] is None
    assert stages["stage 1 discovery"]["rate"] == "missing from RESULTS.md"
    assert "discovery_h200" not in p["citations"]


def test_plan_command_line(capsys):
    assert plan.main(["--gpus", "4", "--kind", "h200", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["gpus"] == 4 and p["kind"] == "h200" and p["measured_total_s"] > 0
    assert plan.main(["--gpus", "1", "--kind", "cpu"]) == 0
    assert "Reproduction cost on 1 x CPU" in capsys.readouterr().out


def test_toy_run_whole_chain_gives_the_table(tmp_path):
    """The whole chain on generated scenes with every stage's real command, the ablation rows
    included (toy_run.py --ablations): prepare_gt on the four benchmarks, stage 1, stage 2.2,
    Mean Teacher, the two ablation runs, predictions and COCO evaluation, then the table in the
    paper's layout, whose every number is its evaluation's (x100), and the pseudo-label rows."""
    import subprocess

    work = tmp_path / "toy"
    r = subprocess.run(
        [sys.executable, os.path.join(REPRO, "toy_run.py"), "--work", str(work), "--ablations"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env=cpu_env(),
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    h = work / "hassod"
    text = (h / "table.md").read_text()
    rows = json.loads((h / "table.json").read_text())["rows"]
    assert "| benchmark | Box AR | Box AP | Mask AR | Mask AP |" in text
    assert "| row | Mask AR | Mask AP |" in text and "not run" not in text

    def ev(name):
        return json.loads((h / "eval" / name / "eval.json").read_text())

    def x100(e, iou_type, key):  # the table's number: the evaluation's, x100 to 0.1
        if iou_type not in e or "skipped" in e[iou_type]:
            return None
        return round(100 * e[iou_type][key], 1)

    for b in ("objects365", "lvis", "sa1b"):
        e, row = ev(f"final_{b}"), rows[b]
        assert row["evaluated"] is True
        want = {"Box AR": x100(e, "bbox", "AR@1000"), "Box AP": x100(e, "bbox", "AP"),
                "Mask AR": x100(e, "segm", "AR@1000"), "Mask AP": x100(e, "segm", "AP")}
        assert row["ours"] == want, b
        assert want["Box AR"] is not None, b  # every benchmark has boxes
        paper = chain.PAPER_MAIN[b]
        cells = " | ".join(chain.cell(want[k], paper[k]) for k in paper)
        assert f"| {chain.BENCHMARK_NAMES[b]} | {cells} |" in text, (b, text)
    assert rows["objects365"]["ours"]["Mask AR"] is None  # boxes only
    sources = {"plain": "plain_coco_lvis", "+ level head": "stage2_coco_lvis",
               "+ Mean Teacher": "mt_constant_coco_lvis", "+ adaptive targets": "final_coco_lvis"}
    for row, name in sources.items():
        e = ev(name)
        assert rows[row]["evaluated"] is True, row
        assert rows[row]["ours"] == [x100(e, "segm", "AR@1000"), x100(e, "segm", "AP")], row
    # The predictions scored are the models': the Mean Teacher student's differ from the
    # stage-2.2 detector's, and the plain detector's from both.
    preds = {k: (h / "eval" / k / "predict" / "predictions.json").read_bytes()
             for k in ("stage2_coco_lvis", "final_coco_lvis", "plain_coco_lvis")}
    assert len(set(preds.values())) == 3
    pl = (work / "pseudo_labels" / "table.md").read_text()
    assert "| ensemble (0.1, 0.2, 0.4) |" in pl and "θ = 0.4" in pl
