"""Text scoring: parse a line of text, score it, reduce scores.

``parse(line)`` -> list of lower-case words; ``score(words)`` -> a float
(vocabulary richness times a keyword weight, with some arithmetic per word);
``make_line(i)`` makes a deterministic synthetic line, so pipelines can run
without an input file.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z']+")
VOCAB = [
    *("channel", "select", "context", "cancel", "deadline", "worker", "pool", "stream"),
    *("merge", "fan", "tee", "process", "memory", "buffer", "queue", "pickle"),
    *("signal", "drain", "batch", "score", "parse", "reduce"),
]
KEYWORDS = {"channel": 3.0, "select": 2.0, "cancel": 2.5, "drain": 1.5, "stream": 2.0}


def make_line(i: int | str, words: int = 60) -> str:
    """A deterministic line of ``words`` words for item ``i``."""
    n = int(i)
    x = n * 2654435761 % 4294967296
    out = []
    for _ in range(words):
        x = (x * 1103515245 + 12345) % 2147483648
        out.append(VOCAB[x % len(VOCAB)])
    return " ".join(out)


def parse(line: str) -> list[str]:
    """The words of ``line``, lower-cased."""
    return _WORD.findall(str(line).lower())


def score(words: list[str], rounds: int = 40) -> float:
    """A score of a parsed line: keyword weight x richness, with ``rounds`` of work a word."""
    total = 0.0
    for w in words:
        h = 0
        for _ in range(rounds):
            for ch in w:
                h = (h * 31 + ord(ch)) % 1000003
        total += KEYWORDS.get(w, 1.0) * (1 + h % 7) / 7
    richness = len(set(words)) / max(len(words), 1)
    return round(total * richness, 6)


def score_line(line: str) -> float:
    """``score(parse(line))``: one stage."""
    return score(parse(line))
