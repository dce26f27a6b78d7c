"""Test session set-up.

Eight host devices are forced before JAX is imported anywhere, so that sharding tests
can compare a mesh of 8 CPU devices with a single device in the same process; the processes
tests start get one device and a faster compile (tests/xla_env.py says why).

Under CI (environment variable CI=true, as GitHub Actions and most CI services set it) a
skipped test is a failure: a missing test dependency (`pytest.importorskip`), a missing
device or any other `pytest.skip` would otherwise let a regression pass as a skip. Both
skipped tests and skipped modules (a module-level `importorskip`) are turned into failures
whose message gives the skip reason. Expected failures (`xfail`) are left alone.
"""

import os

import pytest

from tests.xla_env import session_flags

os.environ["XLA_FLAGS"] = session_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _pin_xdist_worker() -> None:
    """Gives each pytest-xdist worker its own share of the CPUs (worker i of n: every n-th CPU
    from the i-th), before JAX starts its thread pools; subprocesses a test starts inherit it.

    Without it every worker's XLA (and each subprocess's) sizes its thread pool to all the
    machine's cores, and on 2 cores the two workers' pools thrash: the toy chain took 615 s in
    the suite against 293 s alone and 342 s alone on one core (2026-12-02, experiments/
    RESULTS.md). HASSOD_TEST_NO_PIN=1 turns it off; with fewer CPUs than workers it does
    nothing."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(
        "PYTEST_XDIST_WORKER_COUNT")
    if (not worker or not count or os.environ.get("HASSOD_TEST_NO_PIN")
            or not hasattr(os, "sched_setaffinity")):
        return
    cpus, n = sorted(os.sched_getaffinity(0)), int(count)
    if len(cpus) >= n:
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) :: n])


_pin_xdist_worker()

# One persistent XLA compilation cache for the session, shared with every subprocess a test
# starts (they inherit the environment): a resumed run, a second demo run or a reference run
# compiles the same programs again, and on a 2-core CI machine compiles dominate. A fresh
# folder per session (no results carried between sessions); HASSOD_TEST_NO_COMPILE_CACHE=1
# turns it off.
if not os.environ.get("HASSOD_TEST_NO_COMPILE_CACHE") and not os.environ.get(
    "JAX_COMPILATION_CACHE_DIR"
):
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="hassod_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# The test files that take longest, longest first (seconds of one xdist worker in the README's
# test command, 2026-12-04: the learning check 672, then 199 down to 40; 2026-12-03: the two
# slow-marked parity files, 283 and 146, when `-m slow` selects them). pytest-xdist hands
# files to the workers in collection order (`--no-loadscope-reorder` in pyproject.toml; by
# default it starts with the files that have the MOST tests), so these start first and the
# short files fill in at the end: the two workers finish together instead of one running a
# minutes-long file alone at the end.
LONGEST_FIRST = (
    "tests/train/test_mt_learning.py",
    "tests/train/test_distributed_mt.py",
    "tests/test_reproduce.py",
    "tests/models/test_d2_train_step.py",
    "tests/train/test_mean_teacher.py",
    "tests/train/test_distributed.py",
    "tests/test_demo.py",
    "tests/models/test_r50_step.py",
    "tests/train/test_mean_teacher_sharding.py",
    "tests/train/test_supervised.py",
    "tests/train/test_mean_teacher_run.py",
    "tests/models/test_vit.py",
    "tests/discovery/test_pipeline.py",
    "tests/models/test_d2_parity.py",
    "tests/models/test_detector.py",
    "tests/discovery/test_crf.py",
    "tests/test_predict_mode.py",
    "tests/discovery/test_hac.py",
    "tests/evaluate/test_predict.py",
    "tests/train/test_bfloat16_step_and_config_errors.py",
    "tests/weights/test_detectron2.py",
)


def pytest_collection_modifyitems(config, items):
    """LONGEST_FIRST's files first, in its order; every other file after them as collected
    (a stable sort: the tests of a file keep their order)."""
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True)
def _restore_environment():
    """Puts os.environ back as it was after each test. A test that calls a script's main()
    in-process (toy_run.py --dry-run sets up its children's XLA flags and compilation cache in
    os.environ) must not change the session's: JAX reads XLA_FLAGS when the first later test
    starts its backend, and with toy_run's flags that backend had 1 device, not 8."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


def skips_fail() -> bool:
    """True when skips must fail: the environment variable CI is set to a true value."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (path, lineno, reason); anything else is shown as it is.
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, reason = longrepr
        reason = str(reason).removeprefix("Skipped: ")
        return f"{reason} ({path}:{lineno})"
    return str(longrepr)


def _ci_message(what: str, longrepr) -> str:
    return (
        f"{what} was skipped under CI=true: {_skip_reason(longrepr)}. Every test must run in "
        "CI: install the missing test dependency (or provide what the test needs), or unset CI "
        "to allow skips locally."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if skips_fail() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = _ci_message(f"test {item.nodeid}", report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if skips_fail() and report.outcome == "skipped":
        report.outcome = "failed"
        report.longrepr = _ci_message(f"module {collector.nodeid}", report.longrepr)
