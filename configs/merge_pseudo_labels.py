"""Join the outputs of sharded discovery jobs (num_jobs > 1, or several processes) in W.

python -m hassod_jax.main --config configs/merge_pseudo_labels.py --workdir W
"""

from hassod_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.discovery()
    c.mode = "merge_pseudo_labels"
    return c
