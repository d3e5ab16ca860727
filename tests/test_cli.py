"""The command line's contract: click's own errors as one `error:` line (exit 2), the fidelity
gate and thread flags, warnings on stderr even with -q, a true last line, and the data options
shared by `compile` and `verify`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner
from test_outputs import assert_one_line_error, write_tiny_model

import fmcompress.compiler
from fmcompress.cli import binding, compile_command, main, verify
from fmcompress.compiler import RUNTIMES, CompileOptions, CompileResult
from fmcompress.errors import VerificationError
from fmcompress.passes.allocate import OBJECTIVES
from fmcompress.passes.fit import METHODS
from fmcompress.passes.plan import Plan, PlannedMap
from fmcompress.reports.analysis import ORT_LEVELS
from fmcompress.train_config import (
    AUGMENTATIONS,
    DEVICES,
    FEATURE_REFERENCES,
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
)

FAST = ["--num-samples", "8", "--batch-size", "4", "--epochs", "1", "--block-epochs", "1", "-q"]
DATA_OPTIONS = {"input_shapes", "act_bytes", "data", "num_samples", "mean", "std", "scale", "batch_size", "seed",
                "threads"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.onnx")


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    """tiny compiled at 32KB with -q: (the CliRunner result, the output path)."""
    out = tmp_path_factory.mktemp("compiled") / "tiny.fmc.onnx"
    result = CliRunner().invoke(main, ["compile", str(tiny), "--ceiling", "32KB", "-o", str(out), *FAST])
    return result, out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Recorder:
    """Stands in for compile_model / verify_pair: records the call, returns a canned result."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def _plan(maps: int = 1, blocked: tuple = ()) -> Plan:
    planned = [PlannedMap(name=f"m{i}", shape=[1, 16, 32, 32], k=8, bytes_before=65536, bytes_after=32768,
                          producer="conv", step=i) for i in range(maps)]
    return Plan(ceiling="32KB", ceiling_bytes=32768, act_bytes=None, maps=planned, not_compressible=list(blocked))


PROBS = {"name": "probs", "role": "output", "shape": [1, 256, 32, 32], "bytes": 1048576, "reason": "graph output"}
SMALL_INPUT = {"name": "x", "role": "input", "shape": [1, 3, 8, 8], "bytes": 768}


# --- 4: click's own errors are one line ---------------------------------------------------


CLICK_ERRORS = {
    "missing command": ([], "missing command"),
    "no such command": (["squash", "m.onnx"], "no such command 'squash'"),
    "missing argument": (["compile", "--ceiling", "4x"], "missing argument 'MODEL'"),
    "missing option": (["compile", "m.onnx"], "missing option '--ceiling'"),
    "no such option": (["analyze", "m.onnx", "--jsn", "a.json"], "no such option"),
    "bad integer": (["compile", "m.onnx", "--ceiling", "4x", "--num-samples", "many"], "'--num-samples'"),
    "bad choice": (["analyze", "m.onnx", "--mode", "peak"], "'--mode'"),
    "out of range": (["verify", "a.onnx", "b.onnx", "--threads", "0"], "'--threads'"),
    "extra argument": (["analyze", "a.onnx", "b.onnx"], "unexpected extra argument"),
    "missing export output": (["export", "resnet18_small"], "needs SOURCE and -o/--output"),
    "bad float list": (["compile", "m.onnx", "--ceiling", "4x", "--mean", "a,b"], "--mean"),
}


@pytest.mark.parametrize("case", CLICK_ERRORS)
def test_click_errors_are_one_line(case):
    args, message = CLICK_ERRORS[case]
    result = CliRunner().invoke(main, args)
    line = assert_one_line_error(result, contains=message)
    assert "Usage:" not in result.output and "Try '" not in result.output
    assert "--help" in line  # where to look


def test_click_errors_in_a_real_process_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fmcompress", "compile", "--ceiling", "4x", "--bogus"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("args", [["--help"], ["compile", "--help"], ["verify", "-h"], ["export", "--help"]])
def test_help_stays_normal(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: ") and "Options:" in result.stdout


def test_version_exits_0():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "version" in result.stdout


# --- 2: fidelity gates and threads ----------------------------------------------------------


def test_gate_and_thread_flags_reach_compile_options(tiny, tmp_path, monkeypatch):
    recorder = Recorder(CompileResult(None, _plan(0), None, report={"plan": {}, "warnings": []}))
    monkeypatch.setattr(fmcompress.compiler, "compile_model", recorder)
    result = invoke("compile", tiny, "--ceiling", "32KB", "--plan-only", "--min-agreement", "0.99",
                    "--max-accuracy-drop", "1.5", "--threads", "3")
    assert result.exit_code == 0, result.output
    options = recorder.calls[0][0][1]
    assert (options.min_agreement, options.max_accuracy_drop, options.threads) == (0.99, 1.5, 3)
    result = invoke("compile", tiny, "--ceiling", "32KB", "--plan-only")
    options = recorder.calls[1][0][1]
    assert (options.min_agreement, options.max_accuracy_drop, options.threads) == (None, None, 1)


@pytest.mark.parametrize(("flag", "value"), [("--min-agreement", "1.5"), ("--min-agreement", "-0.1"),
                                             ("--max-accuracy-drop", "-1"), ("--threads", "0")])
def test_gate_and_thread_values_are_checked(tiny, flag, value):
    assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", flag, value), contains=flag)


def test_a_missed_fidelity_gate_exits_1_and_writes_nothing(tiny, tmp_path, monkeypatch):
    def missed(*args, **kwargs):
        raise VerificationError("top-1 agreement 71.0% is below --min-agreement 99.0%")

    monkeypatch.setattr(fmcompress.compiler, "compile_model", missed)
    result = invoke("compile", tiny, "--ceiling", "32KB", "-o", tmp_path / "m.onnx", "--json", tmp_path / "r.json",
                    "--report", tmp_path / "rep", "--min-agreement", "0.99", "-q")
    assert_one_line_error(result, code=1, contains="--min-agreement")
    assert list(tmp_path.iterdir()) == []


# --- 3: warnings on stderr, a true last line ---------------------------------------------


def test_compile_names_what_it_could_not_compress(compiled):
    result, out = compiled
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"wrote {out}: 1 map(s) compressed; every compressible stored map <= 32768 B; "
        "not compressible and above the ceiling: output 'y' (64.0 KiB)")
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())  # -q: only warnings
    onnx.checker.check_model(onnx.load(str(out)))


def test_warnings_are_printed_even_when_quiet(tiny, tmp_path, monkeypatch):
    report = {"warnings": ["surrogate data: fidelity is indicative only", "only 2 held-out sample(s)"],
              "not_compressible": [PROBS, SMALL_INPUT]}
    recorder = Recorder(CompileResult(onnx.load(str(tiny)), _plan(3, [PROBS]), None, report=report))
    monkeypatch.setattr(fmcompress.compiler, "compile_model", recorder)
    monkeypatch.setattr(fmcompress.compiler, "write_report", lambda result, folder: None)
    out = tmp_path / "m.onnx"
    result = invoke("compile", tiny, "--ceiling", "32KB", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["warning: surrogate data: fidelity is indicative only",
                                          "warning: only 2 held-out sample(s)"]
    assert result.stdout == (f"wrote {out}: 3 map(s) compressed; every compressible stored map <= 32768 B; "
                             "not compressible and above the ceiling: output 'probs' (1.0 MiB)\n")
    assert out.read_bytes() == onnx.load(str(tiny)).SerializeToString()


def test_plan_only_prints_warnings_and_the_truth(tiny, tmp_path, monkeypatch):
    report = {"plan": {}, "warnings": ["the training backend cannot run Gelu: compile would refuse this model"]}
    monkeypatch.setattr(fmcompress.compiler, "compile_model",
                        Recorder(CompileResult(None, _plan(0, [PROBS]), None, report=report)))
    result = invoke("compile", tiny, "--ceiling", "32KB", "--plan-only", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: the training backend cannot run Gelu: compile would refuse this model\n"
    assert result.stdout == ("nothing to compress: every compressible stored map is at or under 32768 B; "
                             "not compressible and above the ceiling: output 'probs' (1.0 MiB)\n")


def test_verify_prints_warnings_and_the_truth(tiny, tmp_path, monkeypatch):
    figures = {"ceiling_bytes": 32768, "over_ceiling": [], "not_compressible_over_ceiling": ["y"],
               "warnings": ["surrogate data"], "peaks": {}}
    monkeypatch.setattr(fmcompress.compiler, "verify_pair", Recorder(figures))
    result = invoke("verify", tiny, tiny, "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: surrogate data\n"
    assert result.stdout == "ok: every compressible stored map <= 32768 B; not compressible and above the ceiling: 'y'\n"
    assert json.loads((tmp_path / "v.json").read_text()) == figures


# --- 5: verify takes compile's data options (one declaration) -----------------------------


def _params(command):
    return {p.name: p for p in command.params}


def test_compile_and_verify_share_the_data_options():
    compile_params, verify_params = _params(compile_command), _params(verify)
    assert compile_params.keys() >= DATA_OPTIONS and verify_params.keys() >= DATA_OPTIONS
    for name in DATA_OPTIONS:
        mine, theirs = compile_params[name], verify_params[name]
        assert (mine.opts, type(mine.type), mine.multiple) == (theirs.opts, type(theirs.type), theirs.multiple), name
        assert name == "num_samples" or (mine.default, mine.help) == (theirs.default, theirs.help), name
    assert (compile_params["num_samples"].default, verify_params["num_samples"].default) == (256, 64)
    # compile holds a quarter out for its fidelity figures; verify scores every sample
    assert "held out" in compile_params["num_samples"].help
    assert "every one is scored" in verify_params["num_samples"].help


def test_verify_passes_every_data_option_on(tiny, tmp_path, monkeypatch):
    figures = {"ceiling_bytes": None, "over_ceiling": [], "warnings": []}
    recorder = Recorder(figures)
    monkeypatch.setattr(fmcompress.compiler, "verify_pair", recorder)
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    result = invoke("verify", tiny, tiny, "--input-shape", "x=2,3,32,32", "--act-bytes", "1", "--data", data,
                    "--num-samples", "12", "--scale", "0.5", "--mean", "0.1,0.2,0.3", "--std", "1,2,3",
                    "--batch-size", "3", "--seed", "7", "--threads", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: no ceiling given or recorded\n"
    kwargs = recorder.calls[0][1]
    assert {k: kwargs[k] for k in ("input_shapes", "act_bytes", "data", "num_samples", "scale", "mean", "std",
                                   "batch_size", "seed", "threads")} == {
        "input_shapes": ["x=2,3,32,32"], "act_bytes": 1, "data": data, "num_samples": 12, "scale": 0.5,
        "mean": (0.1, 0.2, 0.3), "std": (1.0, 2.0, 3.0), "batch_size": 3, "seed": 7, "threads": 2}


def test_verify_defaults_match_compile(tiny, monkeypatch):
    from fmcompress.data import DEFAULT_MEAN, DEFAULT_SCALE, DEFAULT_STD

    recorder = Recorder({"ceiling_bytes": None, "over_ceiling": []})
    monkeypatch.setattr(fmcompress.compiler, "verify_pair", recorder)
    assert invoke("verify", tiny, tiny).exit_code == 0
    kwargs = recorder.calls[0][1]
    assert (kwargs["mean"], kwargs["std"], kwargs["scale"], kwargs["batch_size"], kwargs["seed"],
            kwargs["threads"], kwargs["num_samples"]) == (DEFAULT_MEAN, DEFAULT_STD, DEFAULT_SCALE, 16, 0, 1, 64)


def test_verify_end_to_end_with_data_options(tiny, compiled, tmp_path):
    _, out = compiled
    result = invoke("verify", tiny, out, "--num-samples", "4", "--scale", "0.5", "--batch-size", "2",
                    "--seed", "3", "--threads", "1", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("ok: every compressible stored map <= 32768 B")
    assert json.loads((tmp_path / "v.json").read_text())["ceiling_bytes"] == 32768


# --- 6: options bound to the option dataclasses --------------------------------------------


def test_compile_without_flags_builds_the_dataclass_defaults(tiny, monkeypatch):
    recorder = Recorder(CompileResult(None, _plan(0), None, report={"plan": {}, "warnings": []}))
    monkeypatch.setattr(fmcompress.compiler, "compile_model", recorder)
    assert invoke("compile", tiny, "--ceiling", "32KB", "--plan-only").exit_code == 0
    options = recorder.calls[0][0][1]
    defaults = CompileOptions(ceiling="32KB")
    for field in dataclasses.fields(CompileOptions):
        if field.name not in ("input_shapes", "monitor"):  # the CLI gives [] and its progress monitor
            assert getattr(options, field.name) == getattr(defaults, field.name), field.name
    assert options.input_shapes == [] and options.training == TrainConfig()


def test_every_bound_option_reaches_its_field(tiny, monkeypatch, tmp_path):
    recorder = Recorder(CompileResult(None, _plan(0), None, report={"plan": {}, "warnings": []}))
    monkeypatch.setattr(fmcompress.compiler, "compile_model", recorder)
    flags = {"--traffic": "3x", "--objective": "traffic+latency", "--latency-weight": "0.5", "--method": "random",
             "--epochs": "3", "--block-epochs": "0", "--block-lr": "0.2", "--lr": "0.3", "--optimizer": "sgd",
             "--loss": "ce", "--schedule": "greedy", "--stage-epochs": "2", "--max-samples": "5",
             "--augment": "strong", "--feature-weight": "0.1", "--feature-reference": "self", "--device": "cpu",
             "--target": "0.9", "--ort-level": "all", "--runtime": "ort", "--act-bytes": "1",
             "--block-judge": "calibration", "--block-loss": "mse"}
    args = [item for pair in flags.items() for item in pair]
    result = invoke("compile", tiny, "--ceiling", "32KB", *args, "--resume", "--mean", "0.5", "--std", "2",
                    "--scale", "1", "--checkpoint", tmp_path / "c.ckpt", "--plan-only")
    assert result.exit_code == 0, result.output
    options = recorder.calls[0][0][1]
    assert (options.traffic, options.objective, options.latency_weight, options.method, options.ort_level,
            options.runtime, options.act_bytes, options.resume, options.mean, options.std, options.scale) == \
           ("3x", "traffic+latency", 0.5, "random", "all", "ort", 1, True, (0.5,), (2.0,), 1.0)
    assert options.checkpoint is None  # --plan-only does not train
    assert dataclasses.asdict(options.training) == {**dataclasses.asdict(TrainConfig()), **{
        "epochs": 3, "block_epochs": 0, "block_lr": 0.2, "lr": 0.3, "optimizer": "sgd", "loss": "ce",
        "schedule": "greedy", "stage_epochs": 2, "max_samples": 5, "augment": "strong", "feature_weight": 0.1,
        "feature_reference": "self", "device": "cpu", "target": 0.9, "block_judge": "calibration",
        "block_loss": "mse"}}


def test_choices_are_the_tuples_the_code_checks():
    params = _params(compile_command)
    expected = {"method": METHODS, "objective": OBJECTIVES, "runtime": RUNTIMES, "ort_level": ORT_LEVELS,
                "optimizer": OPTIMIZERS, "loss": LOSSES, "schedule": SCHEDULES, "augment": AUGMENTATIONS,
                "feature_reference": FEATURE_REFERENCES, "device": DEVICES}
    for name, values in expected.items():
        assert list(params[name].type.choices) == list(values), name


def test_every_bound_option_is_declared_once_with_its_field_default():
    rows = [*binding.DATA, *binding.TRAINING, *binding.BUDGET, binding.METHOD, *binding.GATES]
    assert len({row.flag for row in rows}) == len(rows) == len({row.field for row in rows})
    params = _params(compile_command)
    for row in rows:
        field = next(f for f in dataclasses.fields(row.owner) if f.name == row.field)
        default = None if field.default is dataclasses.MISSING else field.default
        assert params[row.field].default == default, row.flag
        assert "/".join(params[row.field].opts + params[row.field].secondary_opts) == row.flag


def test_help_states_what_the_code_does():
    compile_help = invoke("compile", "--help").stdout
    assert "OUTPUT.ckpt" not in compile_help and "fmcompress/checkpoints" in compile_help
    assert "%" not in compile_help
    verify_help = invoke("verify", "--help").stdout
    assert "held out" not in verify_help.replace("none is held out", "")
