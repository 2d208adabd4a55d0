"""Side by side with diffusers (PyTorch): train step, forward pass and a sampling run.

What it measures, per size, on the same machine and batch:
  * ours: the trainer's jitted step (``train_step.make_train_step`` on a 1-device mesh, state
    donated: forward + backward + clipped Adam + EMA), a jitted forward (``train=False``), and
    DDPM ancestral sampling through ``samplers.sample``;
  * theirs: diffusers' ``UNet2DModel`` configured to the same architecture (same channels,
    levels, blocks, attention resolutions with one head, GroupNorm groups and eps 1e-6,
    dropout, conv down/upsampling) with ``DDPMScheduler`` (same beta schedule): a training
    step as in diffusers' ``train_unconditional.py`` (add_noise, MSE on eps, backward,
    clip_grad_norm 1.0, ``torch.optim.Adam``, EMA via ``torch._foreach_lerp_``), a
    ``torch.no_grad`` forward, and the ``scheduler.step`` sampling loop;
  * ``torch.set_num_threads(--torch_threads)`` (default 2, the machine's cores); JAX uses its
    own pool over the same 2 cores.

Each library runs in its own process (the script starts both, ``--rounds`` times in turn):
in one process XLA's and torch's thread pools, both sized to the 2 cores, fight each other
(measured: diffusers' digits train step 1.97 s interleaved with ours in one process, 0.18 s
alone). Each run times ``--repeats`` train steps and forward passes after a warm-up call;
the table gives, per side, the best over runs of the per-run median (all runs are in the
JSON). Sampling runs ``--probe_steps`` DDPM steps (twice, after one warm-up run) and is
extrapolated linearly to 1000 steps: marked "extrap.". Parameter counts of both
networks are printed (identical for the four sizes of ``benchmarks/common.py``).

Run (from the repository root; torch and diffusers come from the ``compare`` extra):
  .venv/bin/python benchmarks/compare_torch.py --quick
  .venv/bin/python benchmarks/compare_torch.py --sizes c64 --train_batch 16 --forward_batch 16

Read it: ``ours/theirs`` is the *speed* ratio (their time / our time): above 1 we are faster.
Issue 8's goal is >= 1.5 in training and sampling at equal architecture, size and batch.
Results go to ``benchmarks/results/compare_torch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from benchmarks import common
from diffusion_jax import _runtime, samplers
from diffusion_jax.models import make_model_fn
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import sharding
from diffusion_jax.train import step as train_step

_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def diffusers_unet(config, shape) -> UNet2DModel:
    """diffusers' ``UNet2DModel`` with the architecture of ``config.model`` on ``shape``."""
    m = config.model
    height, _, channels = shape
    resolutions = [height // 2**level for level in range(len(m.ch_mult))]
    attend = [r in m.attn_resolutions for r in resolutions]
    return UNet2DModel(
        sample_size=height,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=m.num_res_blocks,
        block_out_channels=tuple(m.ch * k for k in m.ch_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        attention_head_dim=None,  # one head over all channels, as ours with num_heads=1
        norm_num_groups=m.num_groups,
        norm_eps=1e-6,
        dropout=m.dropout,
        act_fn="silu",
        downsample_type="conv",
        upsample_type="conv",
        add_attention=True,
    )


class Ours:
    """Our train step, forward and sampler for one size and batch."""

    def __init__(self, config, shape, train_batch, forward_batch):
        self.config, self.shape = config, shape
        mesh = sharding.make_mesh(jax.devices()[:1])
        self.schedule = config_lib.build_schedule(config)
        self.model = config_lib.build_model(config, shape, None)
        tx, lr = config_lib.build_optimizer(config)
        init, _, shardings = train_step.create_train_state(config, self.model, tx, shape, mesh)
        step = train_step.make_train_step(config, self.model, self.schedule, tx, lr, None)
        self.train_step = _runtime.jit(
            step,
            library_fusions=config_lib.cpu_library_fusions(config),
            in_shardings=(shardings, sharding.data_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        self.state = init()
        self.num_params = common.count_params(self.state.params)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (train_batch, *shape), dtype=np.uint8)
        self.batch = sharding.global_batch({"image": images}, mesh)
        self.model_fn = make_model_fn(self.model, train=False)
        self.forward = _runtime.jit(self.model_fn)
        self.x = jax.random.normal(jax.random.key(0), (forward_batch, *shape))
        self.t = jnp.full((forward_batch,), 500, jnp.int32)

    def run_train_step(self):
        self.state, out = self.train_step(self.state, self.batch)
        return jax.block_until_ready(out)

    def run_forward(self):
        return jax.block_until_ready(self.forward(self.state.params, self.x, self.t))

    def run_sampling(self, batch, steps):
        return jax.block_until_ready(
            samplers.sample(
                self.model_fn,
                self.state.params,
                self.schedule,
                jax.random.key(1),
                (batch, *self.shape),
                method="ddpm",
                num_steps=steps,
                variance=self.config.diffusion.variance,
            )
        )


class Theirs:
    """diffusers' train step, forward and sampling loop for the same size and batch."""

    def __init__(self, config, shape, train_batch, forward_batch):
        torch.manual_seed(0)
        self.config, self.shape = config, shape
        self.model = diffusers_unet(config, shape)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        d = config.diffusion
        self.scheduler = DDPMScheduler(
            num_train_timesteps=d.num_timesteps,
            beta_schedule=_BETA_SCHEDULES[d.schedule],
            variance_type="fixed_small" if d.variance == "fixed_small" else "fixed_large",
            clip_sample=True,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.optim.lr)
        self.ema = [p.detach().clone() for p in self.params]
        height, width, channels = shape
        self.images = torch.randint(
            0, 256, (train_batch, channels, height, width), dtype=torch.uint8
        )
        self.x = torch.randn(forward_batch, channels, height, width)
        self.t = torch.full((forward_batch,), 500, dtype=torch.long)

    def run_train_step(self):
        self.model.train()
        x0 = self.images.float() / 127.5 - 1.0
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.diffusion.num_timesteps, (x0.shape[0],))
        x_t = self.scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.model(x_t, t).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.config.optim.ema_decay)
        return loss.item()

    @torch.no_grad()
    def run_forward(self):
        self.model.eval()
        return self.model(self.x, self.t).sample

    @torch.no_grad()
    def run_sampling(self, batch, steps):
        self.model.eval()
        height, width, channels = self.shape
        self.scheduler.set_timesteps(steps)
        x = torch.randn(batch, channels, height, width)
        for t in self.scheduler.timesteps:
            eps = self.model(x, t).sample
            x = self.scheduler.step(eps, t, x).prev_sample
        return x


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_side(side, size, train_batch, forward_batch, sample_batch, repeats, probe_steps):
    """One library's timings for one size, in this process (run by :func:`compare_size`)."""
    config, shape = common.size_config(size, "float32", train_batch)
    impl = (Ours if side == "ours" else Theirs)(config, shape, train_batch, forward_batch)
    load_start = common.load_average()[0]
    first = {
        "train": _timed(impl.run_train_step),
        "forward": _timed(impl.run_forward),
        "sampling": _timed(lambda: impl.run_sampling(sample_batch, probe_steps)),
    }
    times = {"train": [], "forward": [], "sampling": []}
    for _ in range(repeats):
        times["train"].append(_timed(impl.run_train_step))
        times["forward"].append(_timed(impl.run_forward))
    for _ in range(2):
        times["sampling"].append(_timed(lambda: impl.run_sampling(sample_batch, probe_steps)))
    return {
        "params": impl.num_params,
        "first_call_s": first,
        "timings_s": {k: common.summarize(v) for k, v in times.items()},
        "peak_rss_mb": common.peak_rss_mb(),
        "load_start": load_start,
        "load_end": common.load_average()[0],
    }


def compare_size(size, train_batch, forward_batch, sample_batch, repeats, probe_steps, rounds):
    """Both libraries on one size, each in its own process, ``rounds`` times alternately."""
    case = [size, train_batch, forward_batch, sample_batch, repeats, probe_steps]
    sides = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for side in sides:
            result = common.run_isolated(__file__, ["--side", json.dumps([side, *case])])
            if "error" in result:
                raise RuntimeError(f"{side} {size}: {result['error']}")
            sides[side].append(result)
    steps = common.size_config(size)[0].diffusion.num_timesteps
    rows = []
    for what, batch, label in [
        ("train", train_batch, "train step"),
        ("forward", forward_batch, "forward"),
        ("sampling", sample_batch, f"DDPM-{steps} (extrap. from {probe_steps})"),
    ]:
        scale = steps / probe_steps if what == "sampling" else 1.0
        # The median of each run, then the best run: a run hit by a burst of load is dropped.
        ours_s = scale * min(r["timings_s"][what]["median"] for r in sides["ours"])
        theirs_s = scale * min(r["timings_s"][what]["median"] for r in sides["theirs"])
        rows.append(
            {
                "size": size,
                "what": label,
                "batch": batch,
                "ours_s": ours_s,
                "theirs_s": theirs_s,
                "ours_images_per_s": batch / ours_s,
                "theirs_images_per_s": batch / theirs_s,
                "speed_ratio": theirs_s / ours_s,
            }
        )
    return {
        "size": size,
        "description": common.SIZES[size][2],
        "params_ours": sides["ours"][0]["params"],
        "params_theirs": sides["theirs"][0]["params"],
        "runs": sides,
        "repeats": repeats,
        "rounds": rounds,
        "probe_steps": probe_steps,
        "rows": rows,
        "load_start": sides["ours"][0]["load_start"],
        "load_end": sides["theirs"][-1]["load_end"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default grid (a few minutes)")
    parser.add_argument("--sizes", nargs="+", default=["digits", "issue"])
    parser.add_argument("--train_batch", type=int, help="default: 64 (digits, issue), 16")
    parser.add_argument("--forward_batch", type=int, help="default: 64 (digits), 16")
    parser.add_argument("--sample_batch", type=int, help="default: the forward batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe_steps", type=int, default=20)
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--out", default="compare_torch")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: one side, JSON to stdout
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.side:
        side, *case = json.loads(args.side)
        print(json.dumps(measure_side(side, *case), default=float))
        return

    meta = common.machine()
    import diffusers

    meta.update(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        torch_threads=torch.get_num_threads(),
    )
    print(
        f"# {meta['date']}  {meta['cpu']} x{meta['cores']}  jax {meta['jax']}  torch "
        f"{meta['torch']} ({meta['torch_threads']} threads)  diffusers {meta['diffusers']}",
        flush=True,
    )
    results = []
    for size in args.sizes:
        train_batch = args.train_batch or (64 if size in ("digits", "issue") else 16)
        forward_batch = args.forward_batch or (64 if size == "digits" else 16)
        sample_batch = args.sample_batch or forward_batch
        result = compare_size(
            size,
            train_batch,
            forward_batch,
            sample_batch,
            args.repeats,
            args.probe_steps,
            args.rounds,
        )
        results.append(result)
        print(
            f"## {size}: {result['description']}; params ours {result['params_ours']:,} vs "
            f"diffusers {result['params_theirs']:,}; load {result['load_start']:.1f} -> "
            f"{result['load_end']:.1f}; best of {args.rounds} runs of the median of "
            f"{args.repeats}",
            flush=True,
        )
        common.print_table(
            result["rows"],
            [
                ("what", "what", "s"),
                ("batch", "batch", "d"),
                ("ours_s", "ours s", ".3f"),
                ("theirs_s", "diffusers s", ".3f"),
                ("ours_images_per_s", "ours img/s", ".1f"),
                ("theirs_images_per_s", "diffusers img/s", ".1f"),
                ("speed_ratio", "ours/theirs", ".2f"),
            ],
        )
    ratios = [r["speed_ratio"] for res in results for r in res["rows"]]
    meta["peak_rss_mb"] = common.peak_rss_mb()
    path = common.write_json(args.out, {"machine": meta, "results": results})
    print(f"# geometric-mean speed ratio {statistics.geometric_mean(ratios):.2f}; wrote {path}")


if __name__ == "__main__":
    main()
