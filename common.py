"""
What every script does the same way, once: the device and dtype, CPU threads, a GPU's peak, keyed random generators,
reading text files (prompts, problems), checking an output folder and the time format, with one-line errors
(configurator.fail). torch is imported where it is needed: prepare_data.py uses this file without it.
"""

import json
import os
import re
import tempfile

from configurator import fail


def pick_device(device):
    """"" picks cuda > mps > cpu; a named device must exist here."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        fail(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device={device} but torch sees no CUDA GPU here; use --device=cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        fail(f"--device={device} but there are {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not torch.backends.mps.is_available():
        fail(f"--device={device} but MPS is not available here; use --device=cpu")
    return device


def pick_dtype(dtype, device, allowed=("float32", "bfloat16", "float16")):
    """"" means bfloat16 on CUDA cards with bf16 units (emulated bf16 is slower than float32), float32 elsewhere."""
    import torch

    if not dtype:
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = "bfloat16" if bf16 else "float32"
    if dtype not in allowed:
        fail(f"--dtype must be one of {', '.join(allowed)} (or empty for the device's best), got {dtype!r}")
    return dtype


def set_threads(num_threads):
    """CPU threads for torch; 0: OMP_NUM_THREADS if set (torchrun sets 1 per process), else half the cores, so a
    busy core slows a run instead of stalling it."""
    import torch

    if num_threads < 0:
        fail(f"--num_threads must be >= 0 (0: OMP_NUM_THREADS, else half the cores), got {num_threads}")
    if num_threads or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 2) // 2))
    return torch.get_num_threads()


# dense bf16 tensor-core peaks from the vendors' datasheets, matched as whole words of the device name
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L40": 181e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_bf16_flops(device_name):
    """A GPU's dense bf16 peak by its name (torch.cuda.get_device_name), the first listed name it holds as whole
    words (an L40 is not an L4); None for a device not listed (MFU is then n/a)."""
    return next((p for name, p in PEAK_BF16_FLOPS.items() if re.search(rf"\b{name}\b", device_name)), None)


def keyed_generator(seed, *key, device="cpu"):
    """A generator seeded from (seed, *key): a random draw keyed by what it is for (an iteration, a micro-step, a
    batch) is the same in every process and on every resume. (The hash of a tuple of ints is the same in every
    Python process; only str hashes are salted. But hash(-1) == hash(-2): a new key needs more than that change.)"""
    import torch

    return torch.Generator(device).manual_seed(hash((seed, *key)) % 2**63)


def read_text(path, what):
    """A UTF-8 text file's contents, or one line that says what is wrong with it (`what` names the flag)."""
    if not os.path.isfile(path):
        fail(f"{what}: {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        fail(f"{what}: cannot read {path!r} ({err.strerror})")
    try:
        return data.decode("utf-8-sig")  # without the byte-order mark some Windows editors write first
    except UnicodeDecodeError as err:
        at = err.start + 3 * data.startswith(b"\xef\xbb\xbf")  # counted after the byte-order mark
        fail(f"{what}: {path!r} is not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); save it as UTF-8")


def read_prompt(start):
    """--start is the prompt itself, or FILE:path to read it from a file (Windows line ends read as "\n")."""
    return read_text(start[len("FILE:"):], "--start").replace("\r\n", "\n") if start.startswith("FILE:") else start


def writable_dir(path, what="--out_dir"):
    """Make the folder if needed and check that files can be written there, before any work that would end in one."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{what}={path} is a file, not a folder; choose another {what}")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        fail(f"{what}={path} is not writable ({err.strerror}); choose another {what}")
    return path


def restart_log(path, iter_num):
    """A run's log.jsonl as it starts at iteration iter_num: a new run's (0) empty; a resumed run's holds what was
    logged before its checkpoint's iteration and nothing after (a run cut short logged past its last save, and the
    resumed run runs those iterations again), so it reads as one run that never stopped."""
    kept = []
    if iter_num and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["iter"] < iter_num]
    with open(path, "w") as f:
        f.writelines(kept)


def format_seconds(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def pyplot(missing):
    """matplotlib's pyplot, drawing to files only (no window); None, after printing `missing` (one line that says
    what is not drawn and how to install it), when matplotlib is not there: the pictures are optional."""
    try:
        import matplotlib
    except ImportError:
        print(missing)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chat_text(messages, reply=True):
    """Huginn-0125's chat template (the reference's) for [(role, text), ...]: a header per turn, each text trimmed
    and closed by <|end_turn|>, the assistant named Huginn; reply=True opens Huginn's turn after them."""
    header = lambda role: f"<|begin_header|>{'Huginn' if role == 'assistant' else role}<|end_header|>\n\n"
    turns = "".join(header(role) + text.strip() + "<|end_turn|>" for role, text in messages)
    return turns + (header("Huginn") if reply else "")
