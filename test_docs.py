"""The reading path: a README a newcomer reads in minutes, every docs page reachable from it, every command in them
naming real scripts and settings, and code without long units (no file over 500 lines, no function or module-level
block over 80). Reads files only: no model, no subprocess."""

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "*.py")) if not os.path.basename(
    p).startswith(("test_", "conftest")))


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def settings_of(script):
    """The names a script's settings block defines (module-level assignments of plain values), by its syntax tree;
    prepare_data.py's dataset is its first argument."""
    names = set()
    for node in ast.parse(read(script)).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            nodes = node.body  # harness.py keeps its run under a main guard
        else:
            nodes = [node]
        for n in nodes:
            if isinstance(n, ast.Assign) and isinstance(n.value, (ast.Constant, ast.List, ast.Dict, ast.UnaryOp)):
                names |= {t.id for t in n.targets if isinstance(t, ast.Name) and t.id.islower()}
    return names


def test_the_front_door_is_short_and_links_every_page():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 300
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"
    for page in PAGES:  # and every page's links to other pages and pictures resolve
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", read(page)):
            assert os.path.exists(os.path.normpath(os.path.join(REPO, os.path.dirname(page), target))), (page, target)


def test_every_command_names_a_script_and_its_settings():
    """python <script> ... --key=value in README and docs: the script exists and --key is one of its settings."""
    known = {script: settings_of(script) for script in SCRIPTS}
    commands = 0
    for page in PAGES:
        text = read(page).replace("\\\n", " ")
        for command in re.findall(r"python (\w+\.py)([^\n`|&]*)", text):
            script, args = command
            assert script in known, f"{page}: python {script}: no such script"
            for key in re.findall(r"(?:^|\s)--(\w+)", args):
                assert key in known[script], f"{page}: {script} has no setting --{key}"
            commands += 1
    assert commands > 40


def test_config_files_set_real_settings():
    for path in glob.glob(os.path.join(REPO, "config", "*.py")):
        tree = ast.parse(read(os.path.relpath(path, REPO)))
        names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert names <= settings_of("train.py"), (path, names - settings_of("train.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_long_units(script):
    source = read(script)
    assert len(source.splitlines()) <= 500, f"{script} has {len(source.splitlines())} lines"
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno < 80, f"{script}: {node.name} is {node.end_lineno - node.lineno + 1} lines"
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
            assert node.end_lineno - node.lineno < 80, f"{script} line {node.lineno}: a block of " \
                                                       f"{node.end_lineno - node.lineno + 1} lines"


def test_latents_reuses_the_exit_rules():
    """latents.py and exits.py import decode.py's rule objects and hold none of their arithmetic."""
    for script in ("latents.py", "exits.py"):
        source = read(script)
        assert "from decode import" in source
        assert "CONFIDENT" not in source and ".exp() * (" not in source and "class KL" not in source


def test_no_file_shadows_a_module():
    """A top-level file named like a standard module or an installed package is imported in its place, by us and by
    every library we load: kernels.py hid Hugging Face's `kernels` package, which transformers imports once it is
    installed, and peft stopped loading. Our names against the standard library's and every installed distribution's."""
    import importlib.metadata
    import sys
    ours = {name[:-3] for name in os.listdir(REPO) if name.endswith(".py")}
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    assert not ours & taken, f"rename {sorted(ours & taken)}: they shadow modules of the same name"
