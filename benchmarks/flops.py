"""FLOPs per network evaluation of the published diffusion U-Nets (and of the FID Inception), from
XLA's cost analysis, and the GPU-hours of each reproduction in ``docs/reproduce.md`` estimated
from them.

The networks are our ``UNet`` with the published channels, blocks and attention (the options
that make a converted model bit-compatible, e.g. ``norm_eps`` or ``flip_sin_to_cos``, change no
FLOPs and keep their defaults). No weights are allocated: the parameters are
``jax.eval_shape`` structures and the jitted forward is lowered and compiled for them;
``compiled.cost_analysis()["flops"]`` is XLA's count for one call of batch ``--batch``
(a multiply-add counts as two FLOPs), divided by the batch.

The GPU-hours are an **estimate**, not a measurement: total FLOPs of the job divided by an
assumed sustained throughput (``--tflops``, default 40 TFLOP/s, about a quarter of an A100's
156 TFLOP/s TF32 tensor-core peak, which is what XLA uses for float32 matmuls and convolutions
on an A100 by default). Real runs add the sampler's own arithmetic, host work and I/O, and may
reach a different fraction of the peak; scale the hours by ``40 / your TFLOP/s``.

Usage (from the repository root; a few minutes on 2 CPU cores, mostly compiling the 256x256
network)::

  .venv/bin/python benchmarks/flops.py
  .venv/bin/python benchmarks/flops.py --tflops 60 --only ddpm_cifar10,iddpm_cifar10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import common
from diffusion_jax.models import inception
from diffusion_jax.models.unet import UNet

# name -> (UNet fields, image size, what it is). Architectures from the releases' configs:
# diffusers' google/ddpm-* (block_out_channels, layers_per_block, AttnDownBlock2D at 16x16) and
# improved-diffusion's flags and script_util defaults (num_heads 4, attention at 16 and 8,
# use_scale_shift_norm, channel_mult (1,2,2,2) at 32 and (1,2,3,4) at 64, learn_sigma: 6
# output channels).
MODELS: dict[str, tuple[dict[str, Any], int, str]] = {
    "ddpm_cifar10": (
        {"ch": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,)},
        32,
        "DDPM CIFAR-10 (google/ddpm-cifar10-32)",
    ),
    "ddpm_256": (
        {
            "ch": 128,
            "ch_mult": (1, 1, 2, 2, 4, 4),
            "num_res_blocks": 2,
            "attn_resolutions": (16,),
        },
        256,
        "DDPM 256x256 (google/ddpm-celebahq-256, ddpm-ema-church/bedroom/cat-256)",
    ),
    "iddpm_cifar10": (
        {
            "ch": 128,
            "ch_mult": (1, 2, 2, 2),
            "num_res_blocks": 3,
            "attn_resolutions": (16, 8),
            "num_heads": 4,
            "use_scale_shift_norm": True,
            "out_channels": 6,
        },
        32,
        "improved DDPM CIFAR-10 (cifar10_uncond[_vlb]_50M_500K.pt)",
    ),
    "iddpm_imagenet64": (
        {
            "ch": 128,
            "ch_mult": (1, 2, 3, 4),
            "num_res_blocks": 3,
            "attn_resolutions": (16, 8),
            "num_heads": 4,
            "use_scale_shift_norm": True,
            "out_channels": 6,
        },
        64,
        "improved DDPM ImageNet-64 (imagenet64_uncond[_vlb]_100M_1500K.pt)",
    ),
}

# The reproductions of docs/reproduce.md: (job, network, network evaluations).
JOBS: list[tuple[str, str, int]] = [
    ("DDPM CIFAR-10 FID/IS: 50,000 samples x 1,000 ancestral steps", "ddpm_cifar10", 50_000_000),
    ("DDIM CIFAR-10 FID: 50,000 samples x 100 steps", "ddpm_cifar10", 5_000_000),
    ("iDDPM CIFAR-10 bits/dim: 10,000 test images x 4,000 terms", "iddpm_cifar10", 40_000_000),
    ("iDDPM CIFAR-10 FID: 50,000 samples x 4,000 steps", "iddpm_cifar10", 200_000_000),
    ("DDPM 256x256: 64 samples x 1,000 steps (a grid)", "ddpm_256", 64_000),
    ("DDPM 256x256 FID: 50,000 samples x 1,000 steps", "ddpm_256", 50_000_000),
    ("FID Inception: 50,000 samples + 50,000 reference images", "fid_inception", 100_000),
]


def unet_flops(fields: dict[str, Any], size: int, batch: int) -> tuple[float, int]:
    """(FLOPs per image of one forward, parameter count) of a UNet, without real weights."""
    model = UNet(**{"dropout": 0.0, "out_channels": 3, **fields})
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t)["params"], x, t)
    forward = jax.jit(lambda params, x, t: model.apply({"params": params}, x, t))
    compiled = forward.lower(params, x, t).compile()
    return common.compiled_flops(compiled) / batch, common.count_params(params)


def inception_flops(batch: int) -> tuple[float, int]:
    """(FLOPs per image, parameter count) of the FID Inception on 32x32 inputs (it resizes every
    image to 299x299 first, so the input size barely matters)."""
    network = inception.InceptionV3()
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: network.init(jax.random.key(0), x), images)
    compiled = jax.jit(network.apply).lower(variables, images).compile()
    return common.compiled_flops(compiled) / batch, common.count_params(variables["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="batch of the compiled forward")
    parser.add_argument(
        "--tflops", type=float, default=40.0, help="assumed sustained TFLOP/s of one GPU"
    )
    parser.add_argument("--only", default=None, help="comma-separated model names")
    args = parser.parse_args()
    names = list(MODELS) + ["fid_inception"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]

    rows, per_eval = [], {}
    for name in names:
        start = time.time()
        if name == "fid_inception":
            flops, params = inception_flops(args.batch)
            size, what = 299, "FID Inception (pytorch-fid's), 299x299 after resizing"
        else:
            fields, size, what = MODELS[name]
            flops, params = unet_flops(fields, size, args.batch)
        per_eval[name] = flops
        rows.append(
            {
                "name": name,
                "size": f"{size}x{size}",
                "params_m": params / 1e6,
                "gflops": flops / 1e9,
                "what": what,
                "compile_s": time.time() - start,
            }
        )
        print(f"{name}: {flops / 1e9:.2f} GFLOPs/image, {params / 1e6:.1f}M params", flush=True)

    print("\nper network evaluation (XLA cost analysis, batch", args.batch, "):")
    common.print_table(
        rows,
        [
            ("name", "network", "s"),
            ("size", "input", "s"),
            ("params_m", "params (M)", ".1f"),
            ("gflops", "GFLOPs / image", ".2f"),
            ("what", "release", "s"),
        ],
    )

    jobs = []
    for job, name, evaluations in JOBS:
        if name not in per_eval:
            continue
        total = per_eval[name] * evaluations
        jobs.append(
            {
                "job": job,
                "pflops": total / 1e15,
                "hours": total / (args.tflops * 1e12) / 3600,
            }
        )
    print(f"\nestimated GPU-hours at an assumed {args.tflops:g} TFLOP/s sustained (an estimate):")
    common.print_table(
        jobs,
        [("job", "job", "s"), ("pflops", "PFLOPs", ".1f"), ("hours", "GPU-hours", ".2f")],
    )
    path = common.write_json(
        "flops",
        {
            "machine": common.machine(),
            "batch": args.batch,
            "assumed_tflops": args.tflops,
            "networks": rows,
            "jobs": jobs,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
