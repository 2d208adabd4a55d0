"""``python -m diffusion_jax.convert``: import published weights, or export a run.

  python -m diffusion_jax.convert diffusers --src ddpm-cifar10-32 --out workdirs/ddpm_cifar10
  python -m diffusion_jax.convert improved-diffusion --src model.pt --flags "..." --out W
  python -m diffusion_jax.convert to-diffusers --workdir W --out DIR

Prints the path written. Bad input exits with status 2 and one ``error: ...`` line naming the
field, key or argument, as ``train.py`` does.
"""

from __future__ import annotations

import argparse
import sys

from diffusion_jax.convert import from_diffusers, from_improved_diffusion, to_diffusers

COMMANDS = {
    "diffusers": (from_diffusers, "diffusers UNet2DModel + DDPMScheduler -> workdir"),
    "improved-diffusion": (from_improved_diffusion, "improved-diffusion model.pt -> workdir"),
    "to-diffusers": (to_diffusers, "workdir -> diffusers UNet2DModel + DDPMScheduler"),
}


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    module = COMMANDS[args.command][0]
    try:
        written = module.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
