"""The embedded default corpus: synthetic English-like documents with per-character difficulty.

Mixture-of-Recursions claims to spend more recursion depth on hard tokens. To measure that we
need text where the difficulty of each token is *known*. Every document produced here mixes

* easy filler prose from a small word list and sentence templates (class ``filler``),
* multi-digit arithmetic such as ``4821 + 379 = 5200.`` whose answer digits are ``arithmetic``,
* key-value recall: ``k7=42, k13=5`` followed later by ``k7? 42`` (answer digits ``recall``),
* variable tracking: ``a=3. b=a+2. c=b. c? 5.`` (answer digits ``tracking``),

and records one class id per character (index into :data:`DIFFICULTY_CLASSES`). Operands,
operators, keys and punctuation of the puzzles are class ``structure``.

Generation is a pure function of ``(n_docs, seed)``: each document gets its own
``random.Random`` seeded from ``(seed, index)``, so ``generate_documents(10, s)`` is a prefix of
``generate_documents(20, s)`` and no global random state is touched.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

DIFFICULTY_CLASSES: tuple[str, ...] = ("filler", "structure", "arithmetic", "recall", "tracking")
"""Difficulty class names; the index of a name is the class id stored in ``char_classes``."""

FILLER, STRUCTURE, ARITHMETIC, RECALL, TRACKING = range(len(DIFFICULTY_CLASSES))

MIN_DOC_CHARS = 300
MAX_DOC_CHARS = 1500


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    ``char_classes`` holds one difficulty class id per character of ``text`` (so its length
    equals ``len(text)``); it is ``None`` for real text, whose difficulty is unknown.
    """

    id: str
    text: str
    source: str
    char_classes: bytes | None = None


# A segment is a list of (text, class id) pieces; documents are concatenations of segments.
Piece = tuple[str, int]

_NOUNS = (
    "cat", "dog", "farmer", "river", "teacher", "child", "garden", "city", "bird", "house",
    "tree", "road", "market", "ship", "baker", "window", "letter", "song", "friend", "village",
    "lamp", "boat", "horse", "story", "book", "table", "hill", "cloud", "door", "apple",
)  # fmt: skip
_ADJECTIVES = (
    "small", "old", "quiet", "green", "bright", "warm", "happy", "tall", "slow", "red",
    "young", "busy", "calm", "cold", "kind", "little", "new", "long", "soft", "blue",
)  # fmt: skip
_TRANSITIVE = (
    "saw", "found", "liked", "painted", "visited", "carried", "opened", "watched", "followed",
    "helped", "cleaned", "moved", "read", "built", "wanted",
)  # fmt: skip
_INTRANSITIVE = ("slept", "walked", "waited", "smiled", "rested", "sang", "ran", "stayed", "sat")
_ADVERBS = ("slowly", "quietly", "often", "again", "happily", "early", "late", "together")
_PLACES = (
    "in the park", "near the river", "by the old house", "at the market", "after the rain",
    "before noon", "on the hill", "in the garden", "at home", "under the tree",
)  # fmt: skip
_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Ivy", "Jack")
_ARITH_PREFIXES = ("", "", "Compute: ", "Note that ", "We know ", "Check: ")
_RECALL_PREFIXES = ("Table: ", "Here are the values: ", "Remember these: ", "Records: ")
_RECALL_MIDDLES = ("Now answer. ", "Questions: ", "Look them up. ", "")
_TRACK_PREFIXES = ("", "Program: ", "Trace this: ", "Let ")
# Single-letter variable names; 'k' is left out so tracking never looks like a recall key.
_VARIABLES = "abcdefghijmnpqrstuvwxyz"


def _a(word: str) -> str:
    """``word`` with its indefinite article ("a dog", "an apple")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: random.Random) -> str:
    """One easy sentence from a fixed set of templates."""
    c = rng.choice
    template = rng.randrange(6)
    if template == 0:
        return f"The {c(_ADJECTIVES)} {c(_NOUNS)} {c(_TRANSITIVE)} the {c(_NOUNS)}."
    if template == 1:
        return f"{_a(c(_NOUNS)).capitalize()} {c(_INTRANSITIVE)} {c(_PLACES)}."
    if template == 2:
        return f"{c(_NAMES)} {c(_TRANSITIVE)} {_a(c(_ADJECTIVES))} {c(_NOUNS)} {c(_PLACES)}."
    if template == 3:
        return f"Every day the {c(_NOUNS)} {c(_INTRANSITIVE)} {c(_ADVERBS)}."
    if template == 4:
        return f"The {c(_NOUNS)} was {c(_ADJECTIVES)} and the {c(_NOUNS)} was {c(_ADJECTIVES)}."
    return f"{c(_NAMES)} and {c(_NAMES)} {c(_INTRANSITIVE)} {c(_ADVERBS)} {c(_PLACES)}."


def _filler(rng: random.Random, n_min: int = 2, n_max: int = 5) -> list[Piece]:
    text = " ".join(_sentence(rng) for _ in range(rng.randint(n_min, n_max)))
    return [(text, FILLER)]


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _has_carry(a: int, b: int, op: str) -> bool:
    """Whether column-wise ``a op b`` needs a carry (+) or a borrow (-) somewhere."""
    while a or b:
        da, db = a % 10, b % 10
        if (op == "+" and da + db >= 10) or (op == "-" and da < db):
            return True
        a, b = a // 10, b // 10
    return False


def _arithmetic_problem(rng: random.Random) -> list[Piece]:
    op = rng.choice("++-*")
    if op == "*":
        a, b = _number(rng, 2, 3), _number(rng, 1, 2)
    else:
        # Carries are what make the answer digits depend on more than one column; retry a few
        # times to get one (almost all random operands already have one).
        for _ in range(4):
            a, b = _number(rng, 2, 5), _number(rng, 2, 4)
            if op == "-" and a < b:
                a, b = b, a
            if _has_carry(a, b, op):
                break
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return [(f"{a} {op} {b} = ", STRUCTURE), (str(result), ARITHMETIC), (".", STRUCTURE)]


def _arithmetic(rng: random.Random) -> list[Piece]:
    pieces: list[Piece] = [(rng.choice(_ARITH_PREFIXES), FILLER)]
    for i in range(rng.randint(1, 3)):
        if i:
            pieces.append((" ", STRUCTURE))
        pieces.extend(_arithmetic_problem(rng))
    return pieces


def _recall(rng: random.Random) -> list[Piece]:
    keys = rng.sample(range(100), rng.randint(3, 8))
    values = {k: rng.randint(0, 999) for k in keys}
    context = ", ".join(f"k{k}={values[k]}" for k in keys)
    pieces: list[Piece] = [(rng.choice(_RECALL_PREFIXES), FILLER), (context + ".", STRUCTURE)]
    # Filler between the table and the questions makes the answer a long-range lookup.
    pieces.append((" ", FILLER))
    pieces.extend(_filler(rng, 1, 3))
    pieces.append((" " + rng.choice(_RECALL_MIDDLES), FILLER))
    for i, k in enumerate(rng.sample(keys, rng.randint(2, min(4, len(keys))))):
        pieces.append(((" " if i else "") + f"k{k}? ", STRUCTURE))
        pieces.append((str(values[k]), RECALL))
        pieces.append((".", STRUCTURE))
    return pieces


def _tracking(rng: random.Random) -> list[Piece]:
    names = rng.sample(_VARIABLES, rng.randint(3, 6))
    env: dict[str, int] = {}
    statements: list[str] = []
    for _ in range(rng.randint(3, 7)):
        # Mostly introduce a new variable; sometimes update an existing one so the reader
        # has to track state, not just follow a chain of definitions.
        fresh = [v for v in names if v not in env]
        if fresh and (not env or rng.random() < 0.7):
            target = rng.choice(fresh)
        else:
            target = rng.choice(list(env))
        if not env or rng.random() < 0.2:
            value = rng.randint(0, 20)
            statements.append(f"{target}={value}.")
        else:
            src = rng.choice(list(env))
            kind = rng.randrange(3)
            delta = rng.randint(1, 9)
            if kind == 0:
                value = env[src]
                statements.append(f"{target}={src}.")
            elif kind == 1 or env[src] < delta:
                value = env[src] + delta
                statements.append(f"{target}={src}+{delta}.")
            else:
                value = env[src] - delta
                statements.append(f"{target}={src}-{delta}.")
        env[target] = value
    pieces: list[Piece] = [(rng.choice(_TRACK_PREFIXES), FILLER), (" ".join(statements), STRUCTURE)]
    for var in rng.sample(list(env), rng.randint(1, min(2, len(env)))):
        pieces.append((f" {var}? ", STRUCTURE))
        pieces.append((str(env[var]), TRACKING))
        pieces.append((".", STRUCTURE))
    return pieces


_SEGMENTS: dict[str, Callable[[random.Random], list[Piece]]] = {
    "filler": _filler,
    "arithmetic": _arithmetic,
    "recall": _recall,
    "tracking": _tracking,
}

# Document kinds: weights over segment types (same order as _SEGMENTS). Every kind keeps some
# filler so the hard segments sit inside ordinary prose.
_DOC_KINDS: dict[str, tuple[float, float, float, float]] = {
    "prose": (0.8, 0.07, 0.07, 0.06),
    "math": (0.4, 0.6, 0.0, 0.0),
    "recall": (0.4, 0.0, 0.6, 0.0),
    "tracking": (0.4, 0.0, 0.0, 0.6),
    "mixed": (0.25, 0.25, 0.25, 0.25),
}


def _document(rng: random.Random) -> tuple[str, bytes]:
    weights = _DOC_KINDS[rng.choice(list(_DOC_KINDS))]
    makers = list(_SEGMENTS.values())
    target = rng.randint(MIN_DOC_CHARS, MAX_DOC_CHARS - 100)
    texts: list[str] = []
    classes: list[bytes] = []
    length = 0
    while length < target:
        segment = rng.choices(makers, weights)[0](rng)
        if texts:
            segment.insert(0, ("\n" if rng.random() < 0.3 else " ", FILLER))
        seg_len = sum(len(text) for text, _ in segment)
        # Segments are far shorter than MIN_DOC_CHARS, so stopping here still leaves a
        # document of at least MIN_DOC_CHARS characters.
        if length + seg_len > MAX_DOC_CHARS and length >= MIN_DOC_CHARS:
            break
        for text, cls in segment:
            texts.append(text)
            classes.append(bytes((cls,)) * len(text))
        length += seg_len
    return "".join(texts), b"".join(classes)


def generate_documents(n_docs: int, seed: int = 0) -> list[Document]:
    """Generate ``n_docs`` synthetic documents, deterministically for ``seed``.

    Ids look like ``synthetic-s0-000123``; texts are pure ASCII, 300-1500 characters.
    """
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    docs = []
    for i in range(n_docs):
        # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs
        # and processes (unlike hash()) and distinct for every (seed, index).
        rng = random.Random(f"mor-bench-synthetic/{seed}/{i}")
        text, classes = _document(rng)
        docs.append(Document(f"synthetic-s{seed}-{i:06d}", text, "synthetic", classes))
    return docs
