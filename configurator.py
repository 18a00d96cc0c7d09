"""
Poor man's configurator, after nanoGPT's, and the checks every script makes before it works. A script keeps its
settings as plain globals at the top of the file and overrides them from the command line in one call:

    config = configure(globals())   # python train.py config/train_shakespeare_char.py --batch_size=32 --compile False

- a bare argument is a config file (.py), run as Python; it may set any of the script's settings
- `--key=value` or `--key value` sets one setting; the value is read as a Python literal (else as a string)
- unknown keys and wrong types stop with a one-line error; an int is accepted where a float is expected, and a
  single value where a list is expected (--r=8 is --r=[8])

Then the script checks its settings with whole(), number(), one_of() and steps() below, each a one-line error that
names the flag, before any slow step: bad input never costs a run.
"""

import ast
import os
import sys

SETTING_TYPES = (int, float, bool, str, list, tuple, dict, type(None))


def fail(message):
    """Stop with one line for the user, not a traceback."""
    sys.exit(f"error: {message}")


def parse_value(key, text, default):
    """A command-line string as the type of the default."""
    if isinstance(default, str):
        return text  # strings are taken as typed: --start 123 is the prompt "123"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text  # not a literal, e.g. --dtype=bfloat16 where the default is None
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return check_type(key, value, default)


def check_type(key, value, default):
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --learning_rate=1 means 1.0
    if isinstance(default, list) and isinstance(value, (int, float, str, tuple)) and not isinstance(value, bool):
        value = list(value) if isinstance(value, tuple) else [value]  # --r=8 means [8]; --r=1,2 means [1, 2]
    if default is not None and type(value) is not type(default):
        fail(f"{key} expects {type(default).__name__} (default {default!r}), got {value!r}")
    return value


def configure(namespace, argv=None):
    """The script's settings (the plain lower-case values in `namespace` so far, i.e. its globals()), overridden
    from argv (default sys.argv[1:]) left to right, written back into the namespace. Returns them as a dict."""
    defaults = {k: v for k, v in namespace.items()  # CONSTANTS (upper case, e.g. imported tables) are not settings
                if not k.startswith("_") and not k.isupper() and isinstance(v, SETTING_TYPES)}
    config = dict(defaults)
    args = list(sys.argv[1:] if argv is None else argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            config.update(read_config_file(arg, defaults))
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in config:
            fail(f"unknown setting --{key} (known: {', '.join(sorted(config))})")
        if not sep:  # --key value, or a bare --flag (True) for a setting that is a bool or None by default
            if isinstance(defaults[key], (bool, type(None))) and (not args or args[0].startswith("--")):
                text = "True"
            elif not args or args[0].startswith("--") and args[0][2:].partition("=")[0] in config:
                fail(f"--{key} needs a value (a value that starts with -- is given as --{key}=...)")
            else:
                text = args.pop(0)
        config[key] = parse_value(key, text, defaults[key])
    namespace.update(config)
    return config


def read_config_file(path, defaults):
    """The settings a config file (Python) sets, checked against the script's defaults (not against what an earlier
    file or flag set: r = None after --r 8 is the default's type)."""
    if not os.path.isfile(path):
        fail(f"config file {path!r} not found (settings are given as --key=value)")
    if not path.endswith(".py"):
        fail(f"{path}: a bare argument is a config file (Python, .py); give files of data as --input={path}")
    file_settings = {}  # one namespace, as a module has: a comprehension in the file sees the names it set
    try:  # a config file is Python; a mistake in it is the user's to fix, in one line
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), file_settings)
    except Exception as err:
        fail(f"config file {path}: {type(err).__name__}: {err}")
    settings = {}
    for key, value in file_settings.items():
        if key.startswith("_") or type(value).__name__ == "module" or callable(value):  # `import math`, `def f`
            continue
        if key not in defaults:
            fail(f"unknown setting {key!r} in {path}")
        settings[key] = check_type(key, value, defaults[key])
    return settings


# -----------------------------------------------------------------------------------------------------------
# checks of settings: each stops with one line that names the flag


def whole(config, low, *keys):
    """Each setting in keys is a whole number >= low, and below 2^63 (it fits the 64 bits torch's seeds take)."""
    for key in keys:
        value = config[key]
        if type(value) is not int or not low <= value < 2**63:
            fail(f"--{key} must be a whole number >= {low} (below 2^63), got {value!r}")


def number(config, key, low=None, high=None, above=None, below=None):
    """A real number within [low, high] (inclusive bounds) and (above, below) (exclusive ones)."""
    value = config[key]
    ok = type(value) in (int, float) and value == value and abs(value) != float("inf")  # no bool, nan or inf
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                  f"<= {high}" if high is not None else "", f"< {below}" if below is not None else ""]
        fail(f"--{key} must be a number {' and '.join(b for b in bounds if b)}, got {value!r}")


def one_of(config, key, choices):
    if config[key] not in choices:
        fail(f"--{key} must be one of {', '.join(map(repr, choices))}; got {config[key]!r}")


def steps(config, key, allow_empty=True):
    """A list of r (steps of the core): whole numbers >= 1."""
    values = config[key]
    if not allow_empty and not values or any(type(r) is not int or r < 1 for r in values):
        fail(f"--{key} must list whole numbers of steps >= 1, e.g. --{key}=\"[1,4,8]\"; got {values!r}")


def decoding_settings(config, criteria):
    """sample.py's and harness.py's exits and cache budget, before the model loads: --exit_criterion one of criteria,
    an --exit_threshold that fits it, a whole --cache_budget. What needs the model: decoding_fits."""
    one_of(config, "exit_criterion", list(criteria))
    if config["cache_budget"] is not None:
        whole(config, 1, "cache_budget")
    threshold, criterion = config["exit_threshold"], config["exit_criterion"]
    if threshold is not None and criterion == "confident-run":  # a count of steps in a row
        whole(config, 1, "exit_threshold")
    elif threshold is not None and criterion == "gate":  # a probability >= 1 - threshold: 1 or more stops at once
        number(config, "exit_threshold", low=0, below=1)
    elif threshold is not None:  # kl and latent-diff stop below a number
        number(config, "exit_threshold", low=0)
    if threshold is not None and criterion == "none":
        fail("--exit_threshold is the exit criterion's: add --exit_criterion (kl, latent-diff, confident-run or gate)")


def decoding_fits(model_config, has_gate, config):
    """The model has what the exits and cache budget ask: a gate fit on it, whole steps of cache entries. Its config
    is enough: a release's is read before its weights (checkpoints.released_config), which take minutes."""
    if config["exit_criterion"] == "gate" and not has_gate:
        fit = f"python exits.py --out_dir={config['out_dir']}" if config.get("init_from", "resume") == "resume" else \
            "the release has none (fine-tune it, or use kl, latent-diff or confident-run)"
        fail(f"--exit_criterion gate needs a gate exits.py fit on this checkpoint: {fit}")
    n_layers_core = model_config.n_layers_core
    if config["cache_budget"] is not None and config["cache_budget"] % n_layers_core:
        fail(f"--cache_budget must be a multiple of n_layers_core ({n_layers_core}), got {config['cache_budget']!r}")
