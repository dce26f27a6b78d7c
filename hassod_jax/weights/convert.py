"""Convert a PyTorch / safetensors checkpoint into hassod_jax's own weight format.

    python -m hassod_jax.weights.convert --input dino_vitbase8_pretrain.pth --output DIR

writes ``DIR/params.msgpack`` (Flax param tree, float32) and ``DIR/arch.json`` (see
:mod:`hassod_jax.weights.formats`); ``hassod_jax.load_dino_vit(DIR)`` reads it back.
The conversion reads the checkpoint without torch, so it runs where torch is absent.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from hassod_jax.weights.formats import save_converted

FAMILIES = ("vit",)


def convert_vit(input_path, output_dir, num_heads: int | None = None) -> dict:
    """Converts a DINO / timm ViT checkpoint; returns the inferred architecture dict."""
    from hassod_jax.models.vit import (
        backbone_state_dict,
        params_from_state_dict,
        vit_arch_from_state_dict,
    )
    from hassod_jax.weights.torch_reader import read_checkpoint

    source = os.fspath(input_path)
    sd = backbone_state_dict(read_checkpoint(source), source)
    arch = vit_arch_from_state_dict(sd, num_heads=num_heads, source=source)
    params = params_from_state_dict(sd, arch, source=source)
    save_converted(output_dir, params, arch, family="vit", source=os.path.basename(source))
    return arch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hassod_jax.weights.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", required=True, help="checkpoint: .pth/.pt/.safetensors")
    parser.add_argument("--output", required=True, help="directory to write (created)")
    parser.add_argument("--family", default="vit", choices=FAMILIES, help="model family")
    parser.add_argument(
        "--num_heads", type=int, default=None, help="ViT heads (default embed_dim / 64)"
    )
    args = parser.parse_args(argv)
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
    from hassod_jax.models.vit import expected_state_dict_shapes

    return expected_state_dict_shapes(arch).values()


if __name__ == "__main__":
    sys.exit(main())
