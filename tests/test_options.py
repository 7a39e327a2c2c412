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


# -- the attribution options (attribution/run_options.py) ----------------------------------------------------------


def _subparser(name):
    from attribution.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_run_options_choices_come_from_the_registries_and_refuse_in_one_line():
    from attribution.features.projectors import PROJECTORS
    from attribution.features.timesteps import STRATEGIES
    from attribution.methods import METHODS
    from attribution.run_options import RunOptions

    specs = {s.name: s for s in fields_of(RunOptions)}
    assert specs["method"].choices == tuple(METHODS) and specs["strategy"].choices == STRATEGIES
    assert specs["projector"].choices == ("auto", *PROJECTORS)
    assert {s.name for s in specs.values() if s.run_only} == {"cache", "store", "batch_size", "memory_budget", "device"}
    for bad, match in [({"projector": "x"}, "unknown projector 'x'; use one of: auto, sjlt"),
                       ({"method": "x"}, "unknown method 'x'"), ({"fn": "x"}, "unknown output function 'x'"),
                       ({"checkpoint_weights": "x"}, "unknown --checkpoint-weights 'x'; use one of: lr, uniform")]:
        with pytest.raises(ConfigError, match=match):
            RunOptions("digits", **bad)


def test_engine_commands_take_their_options_from_the_schema():
    from attribution.run_options import JOURNEY_OPTIONS, RunOptions, run_options

    names = {s.name for s in fields_of(RunOptions)}
    for command in ("featurize", "score", "self-influence"):
        dests = {a.dest for a in _subparser(command)._actions}
        assert names <= dests, (command, names - dests)
    assert set(JOURNEY_OPTIONS) <= {a.dest for a in _subparser("journey")._actions}
    args = _subparser("score").parse_args(["--checkpoint", "digits", "--method", "trak", "--proj-dim", "512",
                                           "--store", "/tmp/s", "--target", "gen:0"])
    assert run_options(args) == RunOptions("digits", method="trak", proj_dim=512, store="/tmp/s")


def test_training_and_bank_commands_take_their_options_from_their_schemas(tmp_path, capsys):
    """train, train-lora and bank build: every option is a field of TrainConfig / BankSpec (help from the schema),
    with the command's own defaults where they differ (train-lora: 10 epochs at 3e-4, a required pipeline)."""
    from attribution.cli import main
    from attribution.evaluation.bank import BankSpec
    from attribution.evaluation.recipes import get_recipe
    from attribution.train import TrainConfig

    bank = next(a for a in _subparser("bank")._actions if isinstance(a, argparse._SubParsersAction)).choices["build"]
    for parser, schema, skip in ((_subparser("train"), TrainConfig, ("pipeline", "rank", "prompt_template")),
                                 (_subparser("train-lora"), TrainConfig, ("preset", "resolution", "schedule")),
                                 (bank, BankSpec, ())):
        actions = {flag: a for a in parser._actions for flag in a.option_strings}
        for spec in fields_of(schema):
            if spec.name not in skip:
                assert actions[spec.flag].dest == spec.name and spec.help in actions[spec.flag].help, spec.name
    args = _subparser("train").parse_args(["--dataset", "digits", "--out", "o", "--flip", "off", "--save-epochs",
                                           "2,4", "--lr", "5e-4"])
    cfg = from_args(TrainConfig, args, indices=None)
    assert (cfg.flip, cfg.save_epochs, cfg.lr, cfg.epochs) == (False, [2, 4], 5e-4, 40)
    lora = _subparser("train-lora").parse_args(["--dataset", "d", "--out", "o", "--pipeline", "p"])
    assert (lora.epochs, lora.lr, lora.rank) == (10, 3e-4, 4)
    args = bank.parse_args(["--name", "b", "--run", "runs/x", "--alpha", "0.8"])
    spec = from_args(BankSpec, args, recipe=get_recipe("tiny-test"))
    assert (spec.full_model, spec.alpha, spec.subsets) == ("runs/x", 0.8, 24)
    for argv, says in ((["train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--save-epochs", "1,b"],
                        "--save-epochs takes"),
                       (["train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--flip", "maybe"],
                        "--flip takes auto, on or off"),
                       (["bank", "build", "--name", "b", "--recipe", "tiny-test", "--alpha", "1.5",
                         "--out", str(tmp_path / "b")], "--alpha must be within (0, 1)")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err
    assert not list(tmp_path.iterdir())


def test_study_and_journey_commands_take_their_options_from_their_schemas(capsys):
    """The counterfactual and journey commands' options are their specs' fields (help from the schema); a field
    with its own parse (targets, removals, steps to attribute) is parsed by the schema: a bad value is one line."""
    from attribution.cli import main
    from attribution.evaluation.counterfactual import StudySpec
    from attribution.journey import JourneyConfig
    from attribution.run_options import FEATURE_OPTIONS

    for command, schema, more in (("counterfactual", StudySpec, FEATURE_OPTIONS), ("journey", JourneyConfig, ())):
        actions = {flag: a for a in _subparser(command)._actions for flag in a.option_strings}
        for spec in fields_of(schema):
            action = actions[spec.flag]
            assert action.dest == spec.name and spec.help in action.help, (command, spec.name)
        assert {"--" + name.replace("_", "-") for name in more} <= set(actions)
    args = _subparser("counterfactual").parse_args(["--bank", "digits", "--targets", "gen:2-4", "--remove",
                                                    "0.05,100", "--methods", "random,dtrak:avg,random"])
    spec = from_args(StudySpec, args, steps=args.steps or 50)
    assert (spec.targets, spec.removals, spec.methods) == ((2, 3, 4), (0.05, 100.0), ("random", "dtrak:avg"))
    defaults = from_args(StudySpec, _subparser("counterfactual").parse_args(["--bank", "digits"]), steps=50)
    assert defaults == StudySpec()  # gen:0-9, random,trak,dtrak, 0.05: the schema's defaults
    args = _subparser("journey").parse_args(["--checkpoint", "digits", "--seed", "3", "--at", "0,5,9"])
    assert from_args(JourneyConfig, args).at == (0, 5, 9)
    for argv, says in ((["counterfactual", "--bank", "digits", "--targets", "val:3"], "only generated targets"),
                       (["counterfactual", "--bank", "digits", "--remove", "-1"], "remove at least one image"),
                       (["journey", "--checkpoint", "digits", "--seed", "1", "--at", "1,x"], "--at takes")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err


@pytest.mark.parametrize("method, option, value", [
    ("pixel-cos", "timesteps", 5), ("pixel-cos", "noises", 3), ("pixel-cos", "projector", "gaussian"),
    ("clip-cos", "proj_dim", 512), ("dtrak", "clip_weights", "clip.pt"), ("trak", "clip_model", "RN50"),
    ("dtrak", "damping", 0.1), ("trak", "curvature_samples", 4), ("dtrak", "checkpoint_weights", "uniform"),
])
def test_an_option_a_method_cannot_use_is_refused_by_the_schema(method, option, value):
    """Bad input (issue 25): an option of a kind the method does not use, set, is one line naming the option and
    the method, from the schema's `applies` (RunOptions) rather than per command; left at its default it is fine."""
    from attribution.options import fields_of as specs
    from attribution.run_options import RunOptions

    flag = next(s.flag for s in specs(RunOptions) if s.name == option)
    with pytest.raises(ConfigError) as exc:
        RunOptions("digits", method=method, **{option: value})
    msg = str(exc.value)
    assert msg.startswith(f"{flag} applies to ") and msg.endswith(f", not {method}") and "\n" not in msg, msg
    RunOptions("digits", method=method)  # the defaults apply to every method


def test_for_method_keeps_only_the_options_that_apply():
    """Values meant for a comparison (D-TRAK beside pixel cosine, K = 2, k = 512): pixel cosine keeps the defaults
    of the gradient options, D-TRAK takes them; an option that applies is still checked."""
    from attribution.run_options import RunOptions

    values = dict(checkpoint="digits", timesteps=2, proj_dim=512, projector="sjlt", clip_weights=None)
    pixel = RunOptions.for_method("pixel-cos", **values)
    dtrak = RunOptions.for_method("dtrak", **values)
    assert (pixel.timesteps, pixel.proj_dim, pixel.projector) == (RunOptions.timesteps, RunOptions.proj_dim, "auto")
    assert (dtrak.timesteps, dtrak.proj_dim, dtrak.projector) == (2, 512, "sjlt")
    with pytest.raises(ConfigError, match="unknown projector"):
        RunOptions.for_method("dtrak", checkpoint="digits", projector="nope")


def test_the_commands_refuse_an_option_the_method_cannot_use(capsys):
    """score with a gradient option for a similarity method, lds with an option none of its methods uses: one
    line each, before any work (no feature cache is made)."""
    from attribution.cli import main

    assert main(["score", "--checkpoint", "digits", "--target", "val:0", "--method", "pixel-cos",
                 "--noises", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --noises applies to the gradient methods (a similarity baseline compares images: no gradients), "
        "not pixel-cos")
    assert main(["lds", "--bank", "digits", "--method", "pixel-cos,pixel-dot", "--timesteps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --timesteps applies to the gradient methods") and "none of: pixel-cos" in err


def test_the_command_line_of_a_similarity_baseline_names_only_its_options():
    """A pixel-similarity column's equivalent command line (the Attribute page, the trust verdict's baseline): no
    gradient or CLIP options, and making it does not set an option pixel similarity cannot use (it set
    --clip-weights to a placeholder, which the schema now refuses); CLIP's names its weights file."""
    from attribution.methods import get_method
    from attribution.run_options import RunOptions

    pixel = RunOptions("digits", method="pixel-cos", timesteps=10)
    line = pixel.command_line("score", cfg=get_method("pixel-cos").feature_config(), dataset="digits")
    assert "--method pixel-cos" in line and "--clip" not in line and "--timesteps" not in line, line
    clip = RunOptions("digits", method="clip-cos")
    line = clip.command_line("score", cfg=get_method("clip-cos").feature_config(), dataset="digits")
    assert "--clip-weights CLIP_WEIGHTS_FILE" in line, line


def test_a_memory_budget_too_small_for_one_image_is_one_line(capsys, tmp_path):
    from attribution.cli import main

    for budget, says in (("0.5", "needs about 1.2 GiB even one image"), ("-1", "--memory-budget must be a positive")):
        assert main(["featurize", "--checkpoint", "digits", "--memory-budget", budget, "--cache", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err
    assert not list(tmp_path.iterdir())  # refused before anything is written
