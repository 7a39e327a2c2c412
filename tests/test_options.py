"""The options schema: argparse options, values read back and the equivalent command line all come from one place."""

import argparse
import shlex
from dataclasses import dataclass, field

import pytest

from attribution.errors import ConfigError
from attribution.options import add_arguments, check_choice, command_line, fields_of, from_args, opt


@dataclass(frozen=True)
class Toy:
    checkpoint: str = field(default="", metadata=opt("which model", required=True))
    method: str = field(default="dtrak", metadata=opt("the method", choices=lambda: ("dtrak", "trak")))
    proj_dim: int = field(default=4096, metadata=opt("k"))
    lam: float | None = field(default=None, metadata=opt("ridge lambda", flag="--lambda"))
    unit: bool = field(default=False, metadata=opt("normalise"))
    cache: str | None = field(default=None, metadata=opt("cache root", run_only=True))
    internal: int = 3  # no metadata: not an option


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, Toy)
    return from_args(Toy, p.parse_args(argv))


def test_fields_carry_types_defaults_and_choices():
    specs = {s.name: s for s in fields_of(Toy)}
    assert set(specs) == {"checkpoint", "method", "proj_dim", "lam", "unit", "cache"}
    assert specs["proj_dim"].type is int and specs["proj_dim"].flag == "--proj-dim"
    assert specs["lam"].type is float and specs["lam"].optional and specs["lam"].flag == "--lambda"
    assert specs["method"].choices == ("dtrak", "trak")


def test_argparse_round_trip_and_the_command_line_reproduces_the_values():
    opts = parse(["--checkpoint", "digits", "--method", "trak", "--proj-dim", "512", "--lambda", "0.25",
                  "--unit", "--cache", "/tmp/c"])
    assert opts == Toy("digits", "trak", 512, 0.25, True, "/tmp/c")
    line = command_line("score", [opts], extra=[("--target", "gen:0")])
    assert "--cache" not in line  # run-only
    argv = shlex.split(line)[4:]
    assert argv[-2:] == ["--target", "gen:0"]
    assert parse(argv[:-2]) == Toy("digits", "trak", 512, 0.25, True, None)


def test_argparse_refuses_choices_outside_the_registry(capsys):
    with pytest.raises(SystemExit):
        parse(["--checkpoint", "digits", "--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_check_choice_is_one_line():
    with pytest.raises(ConfigError, match="unknown method 'x'; use one of: a, b"):
        check_choice("method", "x", ("a", "b"))
