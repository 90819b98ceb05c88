"""The command line: a user error is one line on stderr and exit code 2, checked before any work."""

import json

import pytest

from dqcompile import cli
from tiny_models import tiny_dit


@pytest.fixture
def tiny(monkeypatch):
    """The commands run on a tiny DiT instead of the embedded model."""
    monkeypatch.setattr(cli, "_embedded_model", lambda device: tiny_dit(out_channels=4))


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--steps", "0"], "argument --steps: 0 is below 1"),
    (["demo", "--steps", "-5"], "argument --steps: -5 is below 1"),
    (["demo", "--samples", "1"], "argument --samples: 1 is below 2"),
    (["demo", "--guidance", "nan"], "argument --guidance: nan is not a finite, non-negative guidance scale"),
    (["search", "--population", "0", "--out", "p.json"], "argument --population: 0 is below 1"),
    (["viz", "--steps", "x"], "argument --steps: 'x' is not an integer"),
])
def test_bad_arguments_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_runtime_errors_are_one_line_and_exit_2(capsys, tmp_path, tiny):
    code, _, err = run(capsys, "quantize", "--spec", "w3a3", "--out", str(tmp_path / "q"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("dqcompile: error: unknown preset 'w3a3'; allowed values: w8a8,")


def test_debug_shows_the_traceback(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown preset 'w3a3'"):
        cli.main(["--debug", "quantize", "--spec", "w3a3", "--out", str(tmp_path / "q")])


def test_an_unwritable_output_is_refused_before_quantizing(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_embedded_model", lambda device: pytest.fail("quantized before checking --out"))
    code, _, err = run(capsys, "quantize", "--out", "/proc/dqcompile/q")
    assert code == 2 and "cannot write /proc/dqcompile/q" in err


def test_a_group_plan_of_another_model_is_refused(capsys, tmp_path, tiny):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"group_sizes": {"blocks.0.fc1": 32}}))
    code, _, err = run(capsys, "quantize", "--spec", "qdit-w4a8", "--group-plan", str(plan), "--out", str(tmp_path / "q"))
    assert code == 2 and "names 1 layer(s) the model does not have (e.g. blocks.0.fc1)" in err
    assert not (tmp_path / "q").exists()


def test_quantize_calibrates_a_calibrated_spec(capsys, tmp_path, tiny):
    code, out, _ = run(capsys, "quantize", "--spec", "ptq4dit-w8a8", "--calibration-samples", "2",
                       "--calibration-steps", "2", "--out", str(tmp_path / "q"))
    assert code == 0 and "CSB+SSC balanced" in out and (tmp_path / "q" / "plan.json").is_file()
