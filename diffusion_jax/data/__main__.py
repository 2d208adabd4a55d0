"""Command line: prepare a dataset, or show what a prepared one holds.

Usage::

  python -m diffusion_jax.data prepare NAME [--data_dir DIR]
  python -m diffusion_jax.data info NAME [--data_dir DIR]

``prepare`` builds ``digits`` and ``folder:PATH`` locally (offline, no TensorFlow); other TFDS
datasets are downloaded and built by TFDS, which needs TensorFlow (``pip install
'diffusion_jax[tf]'``) and the internet. ``info`` never prepares or downloads anything.

Exit codes: 0 success; 1 the dataset is not prepared (the message gives the prepare command)
or preparing failed; 2 bad usage or an unknown dataset.
"""

import argparse
import sys

from diffusion_jax.data import sources


def format_info(info: sources.DatasetInfo) -> str:
    """Human-readable summary of a `DatasetInfo` (what ``info`` prints)."""
    if info.kind == "image":
        batch = "image: uint8 [B, H, W, C]"
    else:
        batch = "x: float32 [B, D]"
    if info.num_classes is not None:
        batch += ", label: int32 [B]"
    lines = [
        f"dataset:     {info.name}",
        f"kind:        {info.kind}",
        f"shape:       {info.shape}",
        f"num_classes: {info.num_classes}",
        f"batches:     {{{batch}}}",
        f"data_dir:    {info.data_dir if info.data_dir else '(generated, nothing stored)'}",
        "splits:",
        *(f"  {split}: {count} examples" for split, count in sorted(info.splits.items())),
    ]
    if info.notes:
        lines.append(f"notes:       {info.notes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.data", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (
        ("prepare", "prepare NAME into DATA_DIR as ArrayRecord"),
        ("info", "print the splits, sizes and shapes of a prepared dataset"),
    ):
        subparser = commands.add_parser(command, help=help_text)
        subparser.add_argument(
            "name", help="TFDS name (mnist, cifar10, ...), digits, folder:PATH, or a toy set"
        )
        subparser.add_argument(
            "--data_dir",
            default=None,
            help="TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
        )
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            info = sources.prepare(args.name, data_dir=args.data_dir)
        else:
            info = sources.get_dataset_info(args.name, data_dir=args.data_dir, prepare_local=False)
    except (sources.DatasetNotPreparedError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
