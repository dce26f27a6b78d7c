"""Small shared utilities: user errors, required config fields, atomic writes, metric writing,
progress."""

import contextlib
import json
import os
import tempfile
import time

from absl import logging


class ConfigError(ValueError):
    """A config is missing a required field or has an invalid value."""


class InputError(ValueError):
    """An input file named by the user is malformed (the message names the file)."""


def require(config, *names, mode=None):
    """Raises ConfigError naming every field in `names` that is unset (None or '')."""
    missing = [n for n in names if n not in config or config[n] in (None, "")]
    if missing:
        where = f" for mode={mode}" if mode else ""
        sets = " ".join(f"--config.{n}=..." for n in missing)
        raise ConfigError(
            f"Missing required config field(s){where}: {', '.join(missing)}. Set {sets}"
        )


def compute_dtype(name, field="dtype"):
    """The jnp dtype a config's compute-dtype name stands for ('float32' or 'bfloat16'); a
    ConfigError naming --config.FIELD for any other."""
    import jax.numpy as jnp  # jax only where a model is built: the command line stays light

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"--config.{field} must be float32 or bfloat16, got {name!r}")
    return dtypes[name]


def current_umask():
    """The process's umask, read without changing it where Linux reports it (os.umask can
    only be read by setting it, which is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path):
    """A binary file to write `path` through: a temporary file in the same folder, renamed to
    `path` when the block ends normally and removed when it raises, so `path` is either the old
    file or the whole new one. The file gets the permissions a plain `open(path, "w")` would
    give it (0o666 less the umask), not the 0o600 of the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data):
    """Writes `data` to `path` atomically (`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path, obj, indent=None):
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def read_json(path, what="JSON file"):
    """Reads a JSON file; a missing or malformed file raises an error naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


class MetricWriter:
    """Writes scalars to TensorBoard (tensorboardX) and to `metrics.jsonl` in `logdir`."""

    def __init__(self, logdir, enable_tensorboard=True):
        os.makedirs(logdir, exist_ok=True)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = None
        if enable_tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir)

    def write_scalars(self, step, scalars):
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self):
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """Counts finished items and logs rate, ETA and the time share of named stages."""

    def __init__(self, total, name="images", every_s=10.0):
        self.total, self.name, self.every_s = total, name, every_s
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.stage_time = {}

    def add_time(self, stage, seconds):
        self.stage_time[stage] = self.stage_time.get(stage, 0.0) + seconds

    def update(self, n=1, force=False):
        self.done += n
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            logging.info("%s", self.summary())

    def summary(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        total_stage = sum(self.stage_time.values()) or 1.0
        shares = ", ".join(f"{k} {100 * v / total_stage:.0f}%" for k, v in self.stage_time.items())
        return (
            f"{self.done}/{self.total} {self.name}, {rate:.2f} {self.name}/s, "
            f"ETA {left:.0f} s" + (f" [{shares}]" if shares else "")
        )


def threshold_name(theta):
    """File-name form of a threshold: 0.4 -> '0.4', 0.05 -> '0.05'."""
    return f"{float(theta):g}"
