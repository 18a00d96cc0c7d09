"""
Poor man's configurator, after nanoGPT's: train.py, sample.py and bench.py keep their settings as plain globals
at the top of the file, and this overrides them from the command line:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile False

- a bare argument is a config file, run as Python; it may set any of the script's settings
- `--key=value` or `--key value` sets one setting; the value is read as a Python literal (else as a string)
- unknown keys and wrong types stop with a one-line error; an int is accepted where a float is expected
"""

import ast
import os
import sys


def fail(message):
    """Stop with one line for the user, not a traceback."""
    sys.exit(f"error: {message}")


def parse_value(key, text, default):
    """A command-line string as the type of the default."""
    if isinstance(default, str):
        return text  # strings are taken as typed: --start 123 is the prompt "123"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # not a literal, e.g. --dtype=bfloat16 where the default is None
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return check_type(key, value, default)


def check_type(key, value, default):
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --learning_rate=1 means 1.0
    if default is not None and type(value) is not type(default):
        fail(f"{key} expects {type(default).__name__} (default {default!r}), got {value!r}")
    return value


def configure(defaults, argv):
    """Return a copy of `defaults` (a script's settings) overridden from argv, applied left to right.

    A script uses it as: config = configure(settings, sys.argv[1:]); globals().update(config)"""
    config = dict(defaults)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"config file {arg!r} not found (settings are given as --key=value)")
            file_settings = {}
            with open(arg) as f:
                source = f.read()
            try:  # a config file is Python; a mistake in it is the user's to fix, in one line
                exec(compile(source, arg, "exec"), {}, file_settings)
            except Exception as err:
                fail(f"config file {arg}: {type(err).__name__}: {err}")
            for key, value in file_settings.items():
                if key.startswith("_") or type(value).__name__ == "module":  # private names, `import math`
                    continue
                if key not in config:
                    fail(f"unknown setting {key!r} in {arg}")
                config[key] = check_type(key, value, config[key])
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in config:
            fail(f"unknown setting --{key} (known: {', '.join(sorted(config))})")
        if not sep:  # --key value, or a bare --flag (True) for a setting that is a bool or None by default
            if isinstance(config[key], (bool, type(None))) and (not args or args[0].startswith("--")):
                text = "True"
            elif not args:
                fail(f"--{key} needs a value")
            else:
                text = args.pop(0)
        config[key] = parse_value(key, text, config[key])
    return config
