"""The commands of ``docs/reproduce.md`` are real: every ``python`` command parses with the
argument parser of the command line it calls, and the improved-diffusion flags with the
converter's own flag parser (nothing is run: the weights are not on this machine)."""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex

import pytest

from diffusion_jax.convert import __main__ as convert_cli
from diffusion_jax.convert import improved_diffusion_flags
from diffusion_jax.evaluation import __main__ as evaluation_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reproduce.md"


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ``bash`` blocks, split as a shell would (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def python_commands() -> list[list[str]]:
    return [words for words in shell_commands(DOC.read_text()) if words[0] == "python"]


def convert_parser() -> argparse.ArgumentParser:
    """``python -m diffusion_jax.convert``'s parser, built as its ``main`` builds it."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax.convert")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in convert_cli.COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=help_text))
    return parser


def data_parser_accepts(argv: list[str]) -> None:
    """``python -m diffusion_jax.data``: ``prepare|info NAME [--data_dir DIR]``."""
    assert argv[0] in ("prepare", "info") and len(argv) in (2, 4), argv
    if len(argv) == 4:
        assert argv[2] == "--data_dir", argv


def sample_flags() -> dict[str, str]:
    """``sample.py``'s absl flags: name -> kind (``integer``, ``float``, ``string``, ...)."""
    source = (REPO / "sample.py").read_text()
    return dict(
        (name, kind) for kind, name in re.findall(r'flags\.DEFINE_(\w+)\(\s*"(\w+)"', source)
    )


def check_sample_command(argv: list[str]) -> None:
    defined = sample_flags()
    assert len(argv) % 2 == 0, f"sample.py takes --flag value pairs: {argv}"
    for name, value in zip(argv[::2], argv[1::2], strict=True):
        assert name.startswith("--"), f"sample.py takes flags only, got {name!r}"
        name = name[2:]
        assert name in defined, f"sample.py has no flag --{name}"
        if defined[name] == "integer":
            int(value)
        elif defined[name] == "float":
            float(value)
        elif defined[name] == "enum":
            assert value in ("ema", "raw"), value
    assert "--workdir" in argv


def test_the_doc_has_the_commands_of_each_number():
    commands = [" ".join(words) for words in python_commands()]
    assert any("convert diffusers" in c and "ddpm-cifar10-32" in c for c in commands)
    assert any("fid" in c and "--method ddpm --steps 1000" in c for c in commands)
    assert any("fid" in c and "--method ddim --steps 100 " in c for c in commands)
    assert any("convert improved-diffusion" in c and "vlb" in c for c in commands)
    assert any("evaluation nll" in c for c in commands)
    assert any("ref-stats" in c for c in commands)
    assert "TBD" not in DOC.read_text()


@pytest.mark.parametrize("index", range(len(python_commands())))
def test_doc_command_parses(index):
    words = python_commands()[index]
    if words[1] == "-m":
        module, argv = words[2], words[3:]
        if module == "diffusion_jax.evaluation":
            evaluation_cli.build_parser().parse_args(argv)
        elif module == "diffusion_jax.convert":
            args = convert_parser().parse_args(argv)
            if args.command == "improved-diffusion":
                improved_diffusion_flags.parse_flags(args.flags)  # refuses unknown flags
        elif module == "diffusion_jax.data":
            data_parser_accepts(argv)
        else:
            pytest.fail(f"docs/reproduce.md runs an unknown module: {module}")
    else:
        assert words[1] == "sample.py", words
        check_sample_command(words[2:])
