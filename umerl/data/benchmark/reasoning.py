"""Queries that describe a digit indirectly, for the ``digits_reason`` task.

:func:`reason_items` enumerates every query of a fixed set of templates, each with the digit it
evaluates to and a one-line explanation (used as the SFT reasoning). The list is deterministic
and its texts are unique; the builder samples from it with a seeded generator.

Templates (``a``, ``b``, ``k`` are number words; every result is a single digit 0..9):

- ``plus``: "three plus four"; ``minus``: "fifteen minus eight"; ``times``: "two times four";
  ``divided``: "eighteen divided by two"; ``half``: "half of fourteen"; ``double``: "double three";
  ``square_root``: "the square root of forty-nine";
- ``after`` / ``before``: "the number that comes right after six" / "right before ten";
- ``fact``: a world-knowledge quantity, e.g. "the number of sides of a triangle";
- ``fact_plus`` / ``fact_minus``: "the number of days in a week minus two";
- ``constant``: e.g. "the smallest odd prime";
- ``letters``: 'the number of letters in the word "house"';
- ``zeros``: "the number of zeros in one thousand".
"""

from __future__ import annotations

from dataclasses import dataclass

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_UNITS = DIGIT_NAMES + ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                        "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def _count(n: int, noun: str) -> str:
    """"one letter", "two letters"."""
    return f"{number_word(n)} {noun}" + ("" if n == 1 else "s")


def number_word(n: int) -> str:
    """English words for 0..99 ("forty-nine")."""
    if not 0 <= n < 100:
        raise ValueError(f"number_word: {n} is out of range 0..99")
    if n < 20:
        return _UNITS[n]
    tens, units = divmod(n, 10)
    return _TENS[tens] + (f"-{_UNITS[units]}" if units else "")


# (phrase, value, explanation): quantities a person knows without looking them up.
FACTS: tuple[tuple[str, int, str], ...] = (
    ("the number of sides of a triangle", 3, "a triangle has three sides"),
    ("the number of sides of a square", 4, "a square has four sides"),
    ("the number of sides of a pentagon", 5, "a pentagon has five sides"),
    ("the number of sides of a hexagon", 6, "a hexagon has six sides"),
    ("the number of sides of an octagon", 8, "an octagon has eight sides"),
    ("the number of legs of a spider", 8, "a spider has eight legs"),
    ("the number of legs of an insect", 6, "an insect has six legs"),
    ("the number of legs of a dog", 4, "a dog has four legs"),
    ("the number of legs of a bird", 2, "a bird has two legs"),
    ("the number of wheels on a bicycle", 2, "a bicycle has two wheels"),
    ("the number of wheels on a tricycle", 3, "a tricycle has three wheels"),
    ("the number of days in a week", 7, "a week has seven days"),
    ("the number of continents", 7, "there are seven continents"),
    ("the number of planets in the solar system", 8, "the solar system has eight planets"),
    ("the number of fingers on one hand", 5, "one hand has five fingers"),
    ("the number of seasons in a year", 4, "a year has four seasons"),
    ("the number of colours in a rainbow", 7, "a rainbow has seven colours"),
    ("the number of strings on a violin", 4, "a violin has four strings"),
    ("the number of faces of a cube", 6, "a cube has six faces"),
    ("the number of corners of a cube", 8, "a cube has eight corners"),
    ("the number of months in a year", 12, "a year has twelve months"),
    ("the number of edges of a cube", 12, "a cube has twelve edges"),
    ("the number of hours on a clock face", 12, "a clock face shows twelve hours"),
    ("the number of minutes in a quarter of an hour", 15,
     "a quarter of an hour is fifteen minutes"),
    ("the number of players on a soccer team on the field", 11,
     "a soccer team has eleven players on the field"),
    ("the number of eggs in a dozen", 12, "a dozen is twelve"),
)

CONSTANTS: tuple[tuple[str, int, str], ...] = (
    ("the smallest prime number", 2, "the smallest prime is two"),
    ("the smallest odd prime", 3, "the primes are two, three, five and so on, and three is the "
     "first odd one"),
    ("the largest single-digit prime", 7, "the single-digit primes are two, three, five and seven"),
    ("the largest single-digit number", 9, "the largest digit is nine"),
    ("the smallest positive whole number", 1, "the smallest positive whole number is one"),
    ("the only even prime number", 2, "two is the only even prime"),
    ("the smallest perfect square greater than one", 4, "two times two is four"),
    ("the smallest perfect cube greater than one", 8, "two times two times two is eight"),
    ("the number of digits in one hundred", 3, "one hundred is written 100, with three digits"),
)

WORDS: tuple[str, ...] = (
    "a", "ox", "cat", "sun", "tree", "bird", "house", "apple", "garden", "window", "picture",
    "blanket", "elephant", "mountain", "chocolate", "telephone", "go", "at", "pen", "lamp",
    "chair", "pencil", "bottle", "rainbow", "umbrella", "dinosaur", "butterfly", "sky", "book",
    "river", "orange", "kitchen", "triangle", "crocodile", "I",
)

POWERS_OF_TEN: tuple[tuple[str, int], ...] = (
    ("ten", 1), ("one hundred", 2), ("one thousand", 3), ("ten thousand", 4),
    ("one hundred thousand", 5), ("one million", 6), ("ten million", 7),
    ("one hundred million", 8), ("one billion", 9),
)


@dataclass(frozen=True)
class ReasonItem:
    text: str
    digit: int
    explanation: str
    template: str


def reason_items() -> list[ReasonItem]:
    """Every query of every template, unique by text, in a fixed order."""
    w = number_word
    out: dict[str, ReasonItem] = {}

    def add(text: str, value: int, explanation: str, template: str) -> None:
        if not 0 <= value <= 9:
            raise ValueError(f"{text!r} evaluates to {value}, not a digit")
        if text not in out:
            out[text] = ReasonItem(text, value, explanation, template)

    for a in range(10):
        for b in range(10 - a):
            add(f"{w(a)} plus {w(b)}", a + b, f"{w(a)} plus {w(b)} is {w(a + b)}", "plus")
    for a in range(1, 21):
        for b in range(1, a + 1):
            if a - b <= 9:
                add(f"{w(a)} minus {w(b)}", a - b, f"{w(a)} minus {w(b)} is {w(a - b)}", "minus")
    for a in range(10):
        for b in range(10):
            if a * b <= 9:
                add(f"{w(a)} times {w(b)}", a * b, f"{w(a)} times {w(b)} is {w(a * b)}", "times")
    for b in range(2, 10):
        for q in range(10):
            add(f"{w(b * q)} divided by {w(b)}", q,
                f"{w(b)} times {w(q)} is {w(b * q)}, so {w(b * q)} divided by {w(b)} is {w(q)}",
                "divided")
    for q in range(1, 10):
        add(f"half of {w(2 * q)}", q, f"{w(q)} plus {w(q)} is {w(2 * q)}", "half")
    for q in range(5):
        add(f"double {w(q)}", 2 * q, f"{w(q)} plus {w(q)} is {w(2 * q)}", "double")
    for q in range(10):
        add(f"the square root of {w(q * q)}", q, f"{w(q)} times {w(q)} is {w(q * q)}",
            "square_root")
    for a in range(9):
        add(f"the number that comes right after {w(a)}", a + 1,
            f"counting on from {w(a)} gives {w(a + 1)}", "after")
    for a in range(1, 11):
        add(f"the number that comes right before {w(a)}", a - 1,
            f"counting back from {w(a)} gives {w(a - 1)}", "before")
    for phrase, value, why in FACTS:
        if value <= 9:
            add(phrase, value, why, "fact")
        for k in range(1, 4):
            if value + k <= 9:
                add(f"{phrase} plus {w(k)}", value + k,
                    f"{why}, and {w(value)} plus {w(k)} is {w(value + k)}", "fact_plus")
            if 0 <= value - k <= 9:
                add(f"{phrase} minus {w(k)}", value - k,
                    f"{why}, and {w(value)} minus {w(k)} is {w(value - k)}", "fact_minus")
    for phrase, value, why in CONSTANTS:
        add(phrase, value, why, "constant")
    for word in WORDS:
        n = len(word)
        spelled = "-".join(word.upper())
        add(f'the number of letters in the word "{word}"', n,
            f"{word} is spelled {spelled}, which is {_count(n, 'letter')}", "letters")
    for phrase, zeros in POWERS_OF_TEN:
        add(f"the number of zeros in {phrase}", zeros,
            f"{phrase} is written 1 followed by {_count(zeros, 'zero')}", "zeros")
    return list(out.values())
