"""Convert checkpoints between PyTorch / detectron2 files and hassod_jax's own formats.

    python -m hassod_jax.weights.convert --input dino_vitbase8_pretrain.pth --output DIR

writes ``DIR/params.msgpack`` (Flax param tree, float32) and ``DIR/arch.json`` (see
:mod:`hassod_jax.weights.formats`); ``hassod_jax.load_dino_vit(DIR)`` reads it back.

    python -m hassod_jax.weights.convert --detector --to detectron2 --input W3 --output model.pth
    python -m hassod_jax.weights.convert --detector --to hassod_jax --input model.pth --output DIR

convert a detector: from anything ``hassod_jax.load_detector`` reads (our training workdir, an
orbax step directory, an exported model directory, a detectron2/HASSOD ``.pth``/``.pkl``) to a
detectron2 checkpoint (``{"model": state_dict}``, the original's key names and shapes; loads
with ``DetectionCheckpointer``) or to our exported-model directory. ``--teacher`` takes the
teacher of a Mean Teacher file. No conversion imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from hassod_jax.weights import detectron2
from hassod_jax.weights.formats import save_converted
from hassod_jax.weights.torch_reader import read_checkpoint
from hassod_jax.weights.torch_writer import save_torch_checkpoint

FAMILIES = ("vit",)


def convert_vit(input_path, output_dir, num_heads: int | None = None) -> dict:
    """Converts a DINO / timm ViT checkpoint; returns the inferred architecture dict."""
    from hassod_jax.weights.dino_vit import (
        backbone_state_dict,
        params_from_state_dict,
        vit_arch_from_state_dict,
    )

    source = os.fspath(input_path)
    sd = backbone_state_dict(read_checkpoint(source), source)
    arch = vit_arch_from_state_dict(sd, num_heads=num_heads, source=source)
    params = params_from_state_dict(sd, arch, source=source)
    save_converted(output_dir, params, arch, family="vit", source=os.path.basename(source))
    return arch


def convert_detector(input_path, output, to: str, which: str = "student") -> str:
    """Converts a detector checkpoint; returns a one-line description of what was written."""
    module, variables = detectron2.load_detector(input_path, which=which)
    if to == "detectron2":
        sd = detectron2.state_dict_from_detector_variables(variables, module.config)
        save_torch_checkpoint(output, {"model": sd})
        what = f"detectron2 checkpoint, {len(sd)} tensors"
    elif to == "hassod_jax":
        detectron2.export_detector(
            output, variables, module.config, source=os.path.basename(os.fspath(input_path))
        )
        what = "hassod_jax exported detector"
    else:
        raise ValueError(f"--to must be 'detectron2' or 'hassod_jax', got {to!r}")
    n = sum(int(np.size(v)) for v in _leaves(variables["params"]))
    return f"wrote {output}: {what} ({n / 1e6:.1f}M parameters)"


def _leaves(tree):
    if hasattr(tree, "items"):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hassod_jax.weights.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", required=True, help="checkpoint: .pth/.pt/.safetensors")
    parser.add_argument("--output", required=True, help="directory to write (created)")
    parser.add_argument("--family", default="vit", choices=FAMILIES, help="model family")
    parser.add_argument(
        "--detector", action="store_true", help="convert a detector (see --to) instead of a ViT"
    )
    parser.add_argument(
        "--to",
        default="detectron2",
        choices=("detectron2", "hassod_jax"),
        help="with --detector: write a detectron2 .pth or our exported-model directory",
    )
    parser.add_argument(
        "--teacher", action="store_true", help="with --detector: a Mean Teacher file's teacher"
    )
    parser.add_argument(
        "--num_heads", type=int, default=None, help="ViT heads (default embed_dim / 64)"
    )
    args = parser.parse_args(argv)
    if args.detector:
        try:
            print(
                convert_detector(
                    args.input, args.output, args.to, "teacher" if args.teacher else "student"
                )
            )
        except ValueError as e:  # CheckpointError and config errors name the file
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        arch = convert_vit(args.input, args.output, num_heads=args.num_heads)
    except ValueError as e:  # CheckpointError and architecture errors name the file
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(
        int(np.prod(v)) for v in _shapes(arch)
    )  # parameter count from the architecture, for the log line
    print(f"wrote {args.output}: {args.family} {arch} ({n / 1e6:.1f}M parameters)")
    return 0


def _shapes(arch):
    from hassod_jax.weights.dino_vit import expected_state_dict_shapes

    return expected_state_dict_shapes(arch).values()


if __name__ == "__main__":
    sys.exit(main())
