#!/usr/bin/env bash
# Both stages on one GPU against their PyTorch peers, in ONE device call.
#
# THE DEVICE CALL (the session's `run` tool), prepared and checked on CPU (SMOKE=1, below):
#   kind:      nvidia-h200 (the targets are H200 figures, and its 139 GiB let the
#              float32 Mean Teacher step run at 8 + 8; on an H100 batches are halved to fit)
#   timeout_s: 600
#   carry:     [".whl"]
#   command (one line):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash experiments/gpu_bench.sh
# .whl/ (git-ignored) holds the wheels the GPU machine lacks, for its Python 3.12; make it here
# first with   bash experiments/gpu_bench.sh --wheels   (pip download, about 5 MB:
# ml_collections and pycocotools, which the discovery part needs; grain, array_record,
# portpicker and importlib_resources for the training pipeline's grain mode). Without them
# the discovery part fails at import and train_bf16 times the in-process pipeline instead.
#
# Parts, in priority order; each has its own timeout (the cap below) and all share a total
# budget (BUDGET_S, default 525 s, so the command ends inside 9 minutes whatever the parts
# take; a part that would get under 20 s is skipped). The caps add up to more than the budget:
# if the compiles take longer than estimated (RESULTS.md, 2026-12-07), the last parts are cut.
#   train_bf16   ours: the R50-FPN Cascade Mask R-CNN training step (forward, losses, backward,
#                SGD), 800x1333 images in the 800x1344 bucket, bfloat16, batch BATCH (default
#                16, halved until its compiled memory fits; the largest batch that would fit
#                is estimated), pipeline off (premade) and on (grain, 12 workers); then a
#                jax.profiler trace of 2 steps, by source function    (bench_train.py)  150 s
#   torchvision  torchvision's maskrcnn_resnet50_fpn training step, same size and batch,
#                float32 and bfloat16 autocast                  (bench_torchvision.py)   45 s
#   mt           the Mean Teacher step at 8 + 8 (halved until it fits) in float32, as the
#                recipe runs it, against the plain step at 16 in the same run: the plain
#                step is also our float32 training step, pipeline off (bench_mean_teacher.py)
#                                                                                        230 s
#   discovery    stage 1 in a steady state: 32 photos, ViT-B/8 bf16 then COCO-like feature
#                maps (100+ regions at θ 0.4), JAX CRF, device batch 8 (the config's default;
#                at 256 labels each CRF array is 0.2-0.4 GB per image, several live at once:
#                an estimate); an untimed first pass compiles every CRF label bucket
#                                                                 (bench_discovery.py)  100 s
#   features     ViT-B/8 keys, bfloat16, batch 32, against the PyTorch DINO model
#                                                                  (bench_features.py)   45 s
# Extra parts (PARTS=...): train_f32 (ours float32 through bench_train.py), mt_bf16,
# profile (profile_detector.py), detector (bench_detector.py forward+backward), hac, crf.
#
# Results under $OUT (a device call brings back at most 8 files; this writes 3):
#   results.json              every part's JSON with its exit status, seconds and limit, merged
#                             after each part (a part stopped by its timeout keeps what it wrote)
#   gpu_bench.log             everything the parts printed
#   trace_train_bf16.json.gz  the perfetto trace of 2 bfloat16 steps (if under 15 MB)
# The last lines printed are a summary (the device reply shows the output's tail).
#
# CPU check with tiny shapes, every part:  SMOKE=1 bash experiments/gpu_bench.sh
# (5 min 12 s on the 2-core development machine, 2026-12-07; it makes the modules that neither
# the GPU machine nor the wheels have, clu and pydensecrf, unimportable).
# Knobs: PARTS="train_bf16 torchvision" (subset and order), BATCH, BUDGET_S, OUT, WORK.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    ml_collections==1.1.0 pycocotools==2.0.11 grain==0.2.18 array_record==0.8.6 \
    portpicker==1.6.0 importlib_resources==7.1.0
  ls -la .whl
  exit
fi

SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/hassod_gpu}
WORK=${WORK:-$(mktemp -d /tmp/gpu_bench.XXXXXX)}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_bench.log"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
# One persistent compilation cache for all parts (mt's plain step is the extra part
# train_f32's program; the default parts share no program).
export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BLOCK=clu,pydensecrf
  BUDGET_S=${BUDGET_S:-1500}
else
  BLOCK=
  BUDGET_S=${BUDGET_S:-525}
fi
BATCH=${BATCH:-16}
PARTS=${PARTS:-"train_bf16 torchvision mt discovery features"}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
# Console lines dropped (they stay in gpu_bench.log): glog/absl info and warnings, libtpu noise.
NOISE='^[IW][0-9]{4} |Logging before InitGoogle|Source Location Trace|^perftools|^=== Source|TPU|^learning/'

# Runs a script with the modules in $BLOCK unimportable (as on the GPU machine).
PYWRAP='import runpy, sys
block = set(filter(None, sys.argv.pop(1).split(",")))
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in block:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU machine "
                                      "has not got it)", name=name)
sys.meta_path.insert(0, _Blocked())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")'

merge() {  # merges $WORK's part files into $OUT/results.json; with "table", prints the summary
  python3 - "$WORK" "$OUT" "${1:-}" <<'PY'
import glob, json, os, sys

work, out, table = sys.argv[1], sys.argv[2], sys.argv[3] == "table"
res = {"parts": {}}
if os.path.exists(os.path.join(work, "env.json")):
    res["env"] = json.load(open(os.path.join(work, "env.json")))
for st in sorted(glob.glob(os.path.join(work, "status_*.json")), key=os.path.getmtime):
    s = json.load(open(st))
    f = os.path.join(work, s["name"] + ".json")
    if os.path.exists(f):
        try:
            s["result"] = json.load(open(f))
        except ValueError as e:
            s["result_error"] = str(e)
    res["parts"][s["name"]] = s
json.dump(res, open(os.path.join(out, "results.json.tmp"), "w"), indent=1)
os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
if not table:
    sys.exit()
sys.excepthook = lambda t, e, tb: print(f"(summary stopped: {t.__name__}: {e}; see results.json)")
P = {k: v.get("result") or {} for k, v in res["parts"].items()}
env = res.get("env", {})


def gib(b):
    return f"{b / 2**30:.1f} GiB" if b else "-"


print(f"\n===== SUMMARY: {env.get('gpu') or env.get('jax_device', '?')}, jax {env.get('jax')}, "
      f"torch {env.get('torch')}, {env.get('date', '')} =====")
for k, v in res["parts"].items():
    flag = " TIMED OUT" if v["rc"] in (124, 137) else " skipped" if v.get("skipped") else ""
    print(f"part {k:11s} exit {v['rc']:>4} after {v['seconds']:4d} s of {v['limit_s']:4d} s{flag}")
ours = {}  # (dtype, mode) -> (images/s, batch)
for part in ("train_bf16", "train_f32"):
    r = P.get(part, {})
    ma = r.get("memory_analysis", {})
    for row in r.get("rows", []):
        ours[(r["dtype"], row["mode"])] = (row["images_per_s"], r["batch"])
        print(f"ours {r['dtype']:8s} {row['mode']:8s} batch {r['batch']:3d}: "
              f"{row['images_per_s']:7.2f} img/s, compile {r['compile_s']:.0f} s, peak "
              f"{gib(row.get('peak_bytes'))}, needs {gib(ma.get('need_bytes'))}, est. max batch "
              f"{ma.get('estimated_max_batch', '-')}")
pa = P.get("mt", {}).get("plain_alone")
if pa:  # the mt part's plain step, timed alone before any halving for the MT step
    dt = P["mt"].get("args", {}).get("dtype", "float32")
    ours.setdefault((dt, "premade"), (pa["images_per_s"], pa["images"]))
    print(f"ours {dt:8s} premade  batch {pa['images']:3d}: {pa['images_per_s']:7.2f} img/s, "
          f"compile {pa['compile_s']:.0f} s (the mt part's plain step, alone)")
tv = {}
for row in P.get("torchvision", {}).get("rows", []):
    tv[row["dtype"]] = (row["images_per_s"], row["batch"])
    print(f"torchvision {row['dtype']:8s} batch {row['batch']:3d}: {row['images_per_s']:7.2f} img/s,"
          f" first step {row['first_step_s']:.1f} s, peak {gib(row.get('peak_bytes'))}")
for (dt, mode), (v, b) in sorted(ours.items()):
    peer = "amp-bf16" if dt == "bfloat16" else "float32"
    if peer in tv:
        same = "" if tv[peer][1] == b else f" (batches differ: {b} vs {tv[peer][1]})"
        print(f"ratio ours {dt} {mode} / torchvision {peer}: {v / tv[peer][0]:.2f}{same}")
prof = P.get("train_bf16", {}).get("profile")
if prof:
    print(f"profile of the bf16 step: {prof['device_ms_per_step']:.0f} ms of "
          f"{'device kernels' if prof['device_events'] else 'host ops'} per step "
          f"({1e3 * prof['traced_wall_s_per_step']:.0f} ms wall); top source functions:")
    for row in prof["by_function"][:10]:
        print(f"  {row['function'][:56]:56s} {row['pass']} {row['ms_per_step']:8.1f} ms "
              f"{100 * row['share']:5.1f}%")
for row in P.get("mt", {}).get("rows", []):
    print(f"mt: {row['step']:12s} {row['images']:3d} images/step {row['images_per_s']:7.2f} img/s, "
          f"step / plain {row['ratio']:.2f}, compile {row['compile_s']:.0f} s")
if P.get("mt", {}).get("peak_gib"):
    print(f"mt: peak {P['mt']['peak_gib']:.1f} GiB over both steps; {P['mt'].get('batch_note', '')}")
d = P.get("discovery", {})
if "images_per_s" in d:
    print(f"discovery: {d['images_per_s']:.2f} img/s ({d['s_per_image']:.3f} s/img, "
          f"{d['speedup_vs_original_one_worker']:.0f}x the original's 13.8 s on one worker), "
          f"{d['images']} images, regions at 0.4/0.2/0.1 "
          f"{[round(x) for x in d['regions_per_image_per_threshold']]}, CRF buckets "
          f"{d.get('crf_label_buckets')}, compiles in the timed pass {d.get('compiles_in_timed_pass')}")
    print("discovery split: " + ", ".join(f"{k} {v:.2f} s ({100 * d['stage_share'][k]:.0f}%)"
                                          for k, v in d["stage_seconds"].items()))
elif d:
    print(f"discovery: warm-up pass only, {d.get('warm_s', 0):.0f} s; regions "
          f"{d.get('regions_per_image_per_threshold')}")
feat = {}
for row in P.get("features", {}).get("rows", []):
    feat[row["impl"]] = row["ms_per_image"]
    print(f"features {row['impl']:10s} {row['model']} {row['dtype']} batch {row['batch']}: "
          f"{row['ms_per_image']:.2f} ms/img")
if len(feat) == 2:
    print(f"features: ours {feat['pytorch'] / feat['hassod_jax']:.1f}x faster than PyTorch DINO")
PY
}

run_part() {  # name cap_seconds command...
  local name=$1 cap=$2 left lim t0 rc=-1 secs=0 skipped=false
  shift 2
  if [ "$1" = py ]; then  # a Python script, through $PYWRAP
    shift
    set -- python3 -c "$PYWRAP" "$BLOCK" "$@"
  fi
  left=$((DEADLINE - $(date +%s) - 5))
  lim=$((cap < left ? cap : left))
  if [ "$lim" -lt 20 ]; then
    echo "=== $name skipped: ${left} s left of the ${BUDGET_S} s budget" | tee -a "$LOG"
    skipped=true
  else
    echo "=== $name ($(date +%T), limit ${lim} s)" | tee -a "$LOG"
    t0=$(date +%s)
    timeout -k 5 "$lim" "$@" 2>&1 | tee -a "$LOG" | grep --line-buffered -v -E "$NOISE"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - t0))
    echo "=== $name exit $rc after $secs s" | tee -a "$LOG"
  fi
  printf '{"name": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "skipped": %s}\n' \
    "$name" "$rc" "$secs" "$lim" "$skipped" >"$WORK/status_$name.json"
  merge
}

{
  echo "gpu_bench.sh $(date -u +%FT%TZ) SMOKE=$SMOKE PARTS=$PARTS BATCH=$BATCH BUDGET_S=$BUDGET_S"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} | tee -a "$LOG"
python3 - "$WORK/env.json" <<'PY' 2>&1 | tee -a "$LOG" | grep -v -E "$NOISE"
import json, os, platform, subprocess, sys, time
env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
       "cpus": os.cpu_count(), "machine": platform.machine()}
try:
    env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=20).stdout.strip()
except Exception as e:  # noqa: BLE001
    env["gpu"] = None
from importlib import metadata
for m in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
          "orbax-checkpoint", "torch", "torchvision", "numpy", "grain", "ml_collections",
          "pycocotools", "scikit-image", "scipy"):
    try:
        env[m] = metadata.version(m)
    except metadata.PackageNotFoundError:
        env[m] = None
import jax
env["jax_device"] = str(jax.devices()[0].device_kind)
env["jax_devices"] = jax.device_count()
try:
    env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
except Exception:  # noqa: BLE001
    env["git"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
PY

W=$WORK
for part in $PARTS; do
  if [ "$SMOKE" = 1 ]; then
    case $part in
    # One 96 x 128 bucket, batch 4: train_f32's program is then mt's plain step (cache hit).
    train_bf16) run_part train_bf16 300 py experiments/bench_train.py --quick --dtype bfloat16 \
      --batch 4 --steps 2 --scenes 4 --scene 96 128 --short-edge 96 --bucket 96 128 \
      --workers 2 --pool 2 --profile-steps 1 --trace-out "$OUT/trace_train_bf16.json.gz" \
      --out "$W/train_bf16.json" ;;
    torchvision) run_part torchvision 200 py experiments/bench_torchvision.py --quick \
      --batch 2 --steps 1 --instances 4 --out "$W/torchvision.json" ;;
    train_f32) run_part train_f32 300 py experiments/bench_train.py --quick --dtype float32 \
      --batch 4 --steps 2 --scenes 4 --scene 96 128 --short-edge 96 --bucket 96 128 \
      --modes premade --pool 2 --out "$W/train_f32.json" ;;
    mt) run_part mt 400 py experiments/bench_mean_teacher.py --steps 2 --pool 2 \
      --out "$W/mt.json" ;;
    discovery) run_part discovery 400 py experiments/bench_discovery.py --quick --crf jax \
      --workers 2 --out "$W/discovery.json" ;;
    features) run_part features 200 py experiments/bench_features.py --quick \
      --models vit_small_patch8 --batches 1 --dtypes float32 --size 224 --no_error \
      --out "$W/features.json" ;;
    *) echo "no smoke form of part $part" ;;
    esac
    continue
  fi
  case $part in
  train_bf16) run_part train_bf16 150 py experiments/bench_train.py --gpu --dtype bfloat16 \
    --batch "$BATCH" --steps 10 --scenes 16 --workers 12 --profile-steps 2 \
    --trace-out "$OUT/trace_train_bf16.json.gz" --out "$W/train_bf16.json" ;;
  torchvision) run_part torchvision 45 py experiments/bench_torchvision.py --batch "$BATCH" \
    --steps 8 --out "$W/torchvision.json" ;;
  mt) run_part mt 230 py experiments/bench_mean_teacher.py --gpu --dtype float32 --steps 5 \
    --out "$W/mt.json" ;;
  discovery) run_part discovery 100 py experiments/bench_discovery.py --images 32 --batch 8 \
    --crf jax --out "$W/discovery.json" ;;
  features) run_part features 45 py experiments/bench_features.py --models vit_base_patch8 \
    --batches 32 --dtypes bfloat16 --iters 5 --no_error --out "$W/features.json" ;;
  # Extra parts, not in the default PARTS.
  train_f32) run_part train_f32 100 py experiments/bench_train.py --gpu --dtype float32 \
    --batch "$BATCH" --steps 8 --scenes 16 --modes premade --out "$W/train_f32.json" ;;
  mt_bf16) run_part mt_bf16 150 py experiments/bench_mean_teacher.py --gpu --dtype bfloat16 \
    --steps 5 --out "$W/mt_bf16.json" ;;
  profile) run_part profile 240 py experiments/profile_detector.py --steps 5 \
    --out "$W/profile.json" ;;
  detector) run_part detector 170 py experiments/bench_detector.py --dtypes bfloat16 \
    --steps 5 --out "$W/detector.json" ;;
  hac) run_part hac 80 py experiments/bench_hac.py --batch 8 64 256 512 --no-oracle \
    --out "$W/hac.json" ;;
  crf) run_part crf 100 py experiments/bench_crf.py --batch 8 --out "$W/crf.json" ;;
  *) echo "unknown part $part" ;;
  esac
done
merge table 2>&1 | tee -a "$LOG"
echo "gpu_bench.sh done in $(($(date +%s) - START)) s; results in $OUT" | tee -a "$LOG"
