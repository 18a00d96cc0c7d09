"""harness.py with lm-eval: loglikelihood against the model's own log-probabilities, batches against one request
at a time, local tasks by r on a three-cups checkpoint (conftest.cups), one-line errors. CPU, offline."""

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

# the tests that run the harness; the one that checks the hint for a missing lm-eval runs without it
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="needs lm-eval (pip install lm-eval)")

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def requests(pairs):
    from lm_eval.api.instance import Instance
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


PAIRS = [("\n0513", "2"), ("\n0", "3"), ("\n4443", "01"), ("\n12", "5"), ("\n3", "1"), ("\n001122", "4")]


@needs_lm_eval
def test_loglikelihood_is_the_sum_of_the_models_own_log_probs(cups):
    import harness
    lm = harness.NanoHuginn(out_dir=str(cups.out), num_steps=4, init_scale=0, device="cpu")
    results = lm.loglikelihood(requests(PAIRS))
    chars = "\n012345"
    for (context, continuation), (ll, greedy) in zip(PAIRS, results):
        ids = torch.tensor([[chars.index(c) for c in context + continuation]])
        with torch.no_grad():  # the model reads all but the last token; position t predicts token t + 1
            log_probs = F.log_softmax(lm.model(ids[:, :-1], num_steps=4, init_scale=0)[0][0], dim=-1)
        n = len(continuation)
        targets = ids[0, -n:]
        expected = log_probs[-n:].gather(-1, targets[:, None]).sum().item()
        assert ll == pytest.approx(expected, abs=1e-5)
        assert greedy == bool((log_probs[-n:].argmax(-1) == targets).all())


@needs_lm_eval
def test_batched_loglikelihood_equals_one_by_one(cups):
    """Requests of different lengths in one padded batch, each with its own keyed noise start: as if alone."""
    import harness
    batched = harness.NanoHuginn(out_dir=str(cups.out), num_steps=4, batch_size=6, device="cpu")
    single = harness.NanoHuginn(out_dir=str(cups.out), num_steps=4, batch_size=1, device="cpu")
    for (a, greedy_a), (b, greedy_b) in zip(batched.loglikelihood(requests(PAIRS)),
                                            single.loglikelihood(requests(PAIRS))):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


@needs_lm_eval
def test_generation_requests_of_two_tasks_keep_their_own_settings(cups):
    """lm-eval sends every task's generation requests in one call: each keeps its own length and stop strings,
    in a batch of several as one by one, from the noise start too."""
    import harness
    from lm_eval.api.instance import Instance
    settings = [{"until": ["\n"], "max_gen_toks": 1}, {"until": ["9"], "max_gen_toks": 6}]
    reqs = [Instance("generate_until", {}, ("\n" + "0123"[:n + 1], settings[n % 2]), n) for n in range(4)]
    outputs = {}
    for batch_size in (4, 1):
        lm = harness.NanoHuginn(out_dir=str(cups.out), num_steps=2, batch_size=batch_size, device="cpu")
        outputs[batch_size] = lm.generate_until(reqs)
    assert outputs[4] == outputs[1]
    assert [len(text) for text in outputs[1]][0::2] == [1, 1] and {len(t) for t in outputs[1][1::2]} != {1}


def run_harness(*args):
    return subprocess.run([sys.executable, "harness.py", "--device=cpu", "--num_threads=1", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)


BAD_INPUT = [  # the two that get as far as lm-eval's task index (the slow ones) first
    (["--tasks=no_such_task"], "unknown task(s) no_such_task"),
    (["--tasks=reasoning", "--exit_criterion=gate"], "needs a gate exits.py fit on this checkpoint"),
    (["--tasks=reasoning", "--r=[0]"], "--r must list whole numbers of steps >= 1"),
    (["--tasks="], "give the tasks to run with --tasks"),
    (["--tasks=reasoning", "--out_dir=/nonexistent/nowhere"], "no checkpoint at /nonexistent/nowhere/ckpt.pt"),
    (["--tasks=reasoning", "--dtype=bfloat16"], "--dtype is the released model's"),
    (["--tasks=reasoning_choice", "--exit_criterion=kl_divergence"], "--exit_criterion must be one of"),
    (["--tasks=reasoning", "--exit_threshold=0.1"], "--exit_threshold is the exit criterion's"),
    (["--tasks=reasoning", "--output=ckpt.pt"], "--output=ckpt.pt: give the name of a .json file"),
    (["--tasks=reasoning", "--output=/tmp"], "--output=/tmp: give the name of a .json file"),
    (["--tasks=reasoning", "--apply_chat_template=True"], "are the release's chat format; "),  # a char model
]


def write_tag_tasks(cups, tasks):
    """The tasks of test_tags_groups_and_filters_each_get_their_rows in the folder tasks: the two local tasks under
    the tag cups_tasks, plain reasoning scored under two filters, and a group without an aggregate metric."""
    tasks.mkdir()
    plain = json.loads((cups.data / "harness" / "reasoning.yaml").read_text())
    choice = json.loads((cups.data / "harness" / "reasoning_choice.yaml").read_text())
    filtered = {**plain, "task": "reasoning_filters", "tag": "cups_tasks", "filter_list": [
        {"name": "kept", "filter": [{"function": "take_first"}]},  # the answer as it is: plain reasoning's score
        {"name": "letters", "filter": [{"function": "regex", "regex_pattern": "([a-z])"}, {"function": "take_first"}]}]}
    for name, task in (("reasoning", plain), ("reasoning_choice", {**choice, "tag": "cups_tasks"}),
                       ("reasoning_filters", filtered), ("cups_group", {"group": "cups_group", "task": ["reasoning"]})):
        (tasks / f"{name}.yaml").write_text(json.dumps(task))


@pytest.fixture(scope="module")
def harness_runs(cups, tmp_path_factory):
    """Every harness.py run of the tests below, started together and run two side by side (each is one thread, and
    most of the bad input's time is lm-eval's imports and task index), the longest first: {name: future of its
    CompletedProcess}. .tmp holds the tables by_r writes, the tag test's tasks and a task whose data moved."""
    tmp = tmp_path_factory.mktemp("harness")
    write_tag_tasks(cups, tmp / "tasks")
    local = [f"--include_path={cups.data / 'harness'}", f"--out_dir={cups.out}"]
    runs = {"by_r": [*local, "--tasks=reasoning,reasoning_choice", "--r=[1,4]", "--limit=200",
                     f"--output={tmp / 'by_r.json'}"],
            "tags": ["--tasks=cups_tasks,cups_group", f"--include_path={tmp / 'tasks'}", f"--out_dir={cups.out}",
                     "--r=[4]", "--limit=40"]}  # into out_dir, beside a full table: harness_limit40.json
    moved = json.loads((cups.data / "harness" / "reasoning.yaml").read_text())  # a data folder moved since
    moved["dataset_kwargs"]["data_files"]["test"] = str(tmp / "gone" / "reasoning.jsonl")
    (tmp / "moved").mkdir()
    (tmp / "moved" / "reasoning.yaml").write_text(json.dumps(moved))
    runs["moved"] = ["--tasks=reasoning", f"--include_path={tmp / 'moved'}", f"--out_dir={cups.out}"]
    runs.update({message: [*local, *args] for args, message in BAD_INPUT})  # args win
    with ThreadPoolExecutor(2) as pool:
        yield SimpleNamespace(tmp=tmp, cups=cups,
                              futures={name: pool.submit(run_harness, *args) for name, args in runs.items()})


@needs_lm_eval
def test_local_tasks_by_r_gain_from_thinking(harness_runs):
    """prepare_data.py wrote two lm-eval tasks beside the data (the final arrangement of each val problem, asked
    for by generation and by multiple choice); both are answered better at r_bar than at r = 1."""
    result = harness_runs.futures["by_r"].result()
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((harness_runs.tmp / "by_r.json").read_text())
    assert written["settings"]["limit"] == 200 and written["settings"]["r"] == [1, 4]  # what it was measured with
    table = written["table"]
    generation, choice = table["reasoning"], table["reasoning_choice"]
    assert generation["4"]["exact_match"] > generation["1"]["exact_match"] + 0.2, table
    assert choice["4"]["acc"] > choice["1"]["acc"] + 0.2, table
    assert "reasoning_choice" in result.stdout and "r=4" in result.stdout


@pytest.mark.parametrize("args,message", BAD_INPUT)
@needs_lm_eval
def test_bad_input_is_one_line(harness_runs, args, message):
    result = harness_runs.futures[message].result()  # harness.py with these args
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr


@needs_lm_eval
def test_a_gate_the_checkpoint_lacks_is_refused_before_gptq(cups, monkeypatch):
    """NanoHuginn checks the exits and cache budget against the checkpoint before int8's calibration (minutes at the
    released size), not after it."""
    import checkpoints
    import harness
    monkeypatch.setattr(checkpoints, "calibration_hessians", lambda *args: 1 / 0)
    with pytest.raises(SystemExit, match="--exit_criterion gate needs a gate exits.py fit on this checkpoint"):
        harness.NanoHuginn(out_dir=str(cups.out), exit_criterion="gate", quantize="int8", device="cpu")


def test_without_lm_eval_one_line_says_how_to_install(tmp_path):
    (tmp_path / "lm_eval").mkdir()
    (tmp_path / "lm_eval" / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run([sys.executable, "harness.py", "--tasks=x"], cwd=REPO, capture_output=True, text=True,
                            env={**ENV, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode != 0 and result.stderr.strip() == "error: harness.py needs the evaluation harness: " \
                                                               "pip install lm-eval"


@needs_lm_eval
def test_task_data_moved_since_is_one_line_before_the_model_loads(harness_runs):
    """prepare_data.py's tasks name their data by its absolute path: a data folder moved since stopped with a
    traceback from the datasets library, after the model and the task index had loaded."""
    result = harness_runs.futures["moved"].result()
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "reasoning.jsonl, which is not there (its data folder moved?)" in result.stderr


@needs_lm_eval
def test_tags_groups_and_filters_each_get_their_rows(harness_runs):
    """--tasks may name an lm-eval tag (its tasks are run and reported), a group without an aggregate metric (its task
    is reported, the group has no row), and a task scoring one metric under two filters (GSM8K's strict-match and
    flexible-extract) reports both (write_tag_tasks). The run kept only the last filter's figure under the metric's
    bare name, and a tag or such a group crashed after the whole evaluation, with nothing written."""
    result = harness_runs.futures["tags"].result()
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((harness_runs.cups.out / "harness_limit40.json").read_text())
    table = {task: by_r["4"] for task, by_r in written["table"].items()}
    assert set(table) == {"reasoning", "reasoning_choice", "reasoning_filters"}, table
    assert table["reasoning_filters"]["exact_match,kept"] == table["reasoning"]["exact_match"] > 0.3, table
    assert table["reasoning_filters"]["exact_match,letters"] == 0, table  # the answers are digits
    assert "acc" in table["reasoning_choice"]
    assert "exact_match,kept" in result.stdout and "exact_match,letters" in result.stdout
