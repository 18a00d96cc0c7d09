"""configurator.py: how every script reads --key=value, --key value, bare flags and config files."""

import os

import pytest

from configurator import configure

DEFAULTS = dict(r=8, learning_rate=1e-3, compile=True, device="", start="\n", eval_r=[1, 4], budget=None)


def test_both_flag_forms_and_types():
    namespace = dict(DEFAULTS)
    config = configure(namespace, ["--r", "32", "--learning_rate=1", "--compile", "False", "--device=cpu",
                                  "--start", "123", "--eval_r=[1,2]", "--budget=4"])
    assert config == dict(r=32, learning_rate=1.0, compile=False, device="cpu", start="123", eval_r=[1, 2], budget=4)
    assert isinstance(config["learning_rate"], float)  # an int is accepted for a float setting
    assert configure(dict(DEFAULTS), ["--compile=False", "--compile"])["compile"] is True  # a bare flag means True
    assert namespace == config  # the script's globals hold the resolved settings


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("import math\nr = 16\nlearning_rate = 3\nstart = 'to be'\n")
    config = configure(dict(DEFAULTS), [str(path), "--r=4"])
    assert (config["r"], config["learning_rate"], config["start"]) == (4, 3.0, "to be")
    # a config file runs as a module does: a comprehension sees the names set above it; imported functions and
    # the file's own are not settings
    path.write_text("from math import sqrt\nr = 16\neval_r = [r // k for k in (1, 2)]\n"
                    "def half(x):\n    return x / 2\nlearning_rate = half(sqrt(4))\n")
    config = configure(dict(DEFAULTS), [str(path)])
    assert (config["eval_r"], config["learning_rate"]) == ([16, 8], 1.0)
    # a file checked against the defaults, not against what came before it: budget = None after --budget=4
    path.write_text("budget = None\n")
    assert configure(dict(DEFAULTS), ["--budget=4", str(path)])["budget"] is None


@pytest.mark.parametrize("argv,message", [
    (["--bogus=1"], "unknown setting --bogus"),
    (["--r=big"], "r expects int"),
    (["--r"], "--r needs a value"),
    (["--device", "--r=4"], "--device needs a value"),  # a flag is not taken as the value before it
    (["--device", "--compile"], "--device needs a value"),
    ([os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")], "a bare argument is a config file"),
    (["missing.py"], "config file 'missing.py' not found"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        configure(dict(DEFAULTS), argv)
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_broken_config_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("r = (\n")
    with pytest.raises(SystemExit, match="SyntaxError"):
        configure(dict(DEFAULTS), [str(path)])
    path.write_text("bogus = 1\n")
    with pytest.raises(SystemExit, match="unknown setting 'bogus'"):
        configure(dict(DEFAULTS), [str(path)])
