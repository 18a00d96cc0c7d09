"""Shared by every test file: tiktoken reads its r50k_base vocabulary from ../shared/tiktoken_cache when that folder
is there (CI and offline machines); elsewhere it downloads it once, as for any user. And play_text, the tests' own
corpus: no test reads a data file from outside the repository."""

import os
import random

_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)  # subprocesses of the tests inherit it


def play_text(n_chars=50_000, seed=0):
    """English-like text in the shape of a play: speakers, lines of varied words and punctuation, some numbers.
    Deterministic (a seeded generator), so every run and every machine tests the same bytes."""
    rng = random.Random(seed)
    speakers = ["KING HENRY", "MARGARET", "First Citizen", "O'NEILL", "Lady Anne", "GLOUCESTER", "Nurse"]
    words = ("the of and to my a that in is not you it with me for be his your this but he have as so will what "
             "her thou by all shall do no if are we thee our on now lord good sir come more they love how would "
             "heaven night day well death king queen blood heart eyes time world honour fair sweet gentle "
             "speak hear tell know stay go away again never ever upon yet though while when where why whence "
             "Rome London York Warwick Friday September quickly jealous zealous vex quiz jump").split()
    ends = [".", ".", ".", "!", "?", ";", ":", ",", " --", "..."]
    out, size = [], 0
    while size < n_chars:
        lines = [rng.choice(speakers) + ":"]
        for _ in range(rng.randint(1, 4)):
            line = [rng.choice(words) for _ in range(rng.randint(3, 11))]
            if rng.random() < 0.1:
                line.insert(rng.randrange(len(line)), str(rng.randint(2, 1999)))
            if rng.random() < 0.15:
                line[0] = "'" + line[0]
                line[-1] += "'"
            line = " ".join(line)
            lines.append(line[0].upper() + line[1:] + rng.choice(ends))
        out.append("\n".join(lines) + "\n\n")
        size += len(out[-1])
    return "".join(out)[:n_chars]
