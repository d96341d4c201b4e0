"""The built-in code task: "write a program that prints ..." for generated specs, with hidden tests.

Each problem is a family and its parameter: an integer transform (`n plus 37`, `n plus 12, halved
and rounded down`) or a string transform (`the first 3 characters of a line`, `how often the letter q
occurs`). The program reads stdin and prints; three hidden stdin/stdout tests per problem are
derived from the problem itself, so the same problem always has the same tests. Expected outputs
come from each family's own pure-Python function, never from running a program.

For the base model's corpus each family also has subtly wrong programs, the slips people make in
such code: `input()` left a string (so `+` concatenates and `*` repeats), `/` where `//` was meant,
`*2` for `**2`, operands swapped, parentheses forgotten, the wrong end of a slice. The first one
listed is the commonest. No slip changes the problem's number: a program copies it exactly, right
or wrong. A worked response reasons in one line, then gives the program in a fenced block.

The task's preset (conf/data/code.yaml) uses the plain template: the tiny model has to copy the
problem's number into its program, and learns that from a few tokens back far better than from
behind R1-Zero's long preamble.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from r1mega.data.prompts import PromptRecord

TESTS = 3  # hidden stdin/stdout tests per problem
SLIP_SHARE = 0.6  # of the wrong programs, the share that makes the family's commonest slip
_NUMBER_MAX = 9999  # integer inputs are 0..9999
_WORD_MAX = 12  # string inputs are 1..12 lowercase letters


@dataclass(frozen=True)
class Family:
    """One kind of problem; `{k}` in the texts is its parameter."""

    spec: str  # the prompt: "Write a Python program that ..."
    think: str  # the one-line reasoning of a worked response
    right: str  # the program
    wrong: Tuple[str, ...]  # subtly wrong programs, the commonest slip first
    solve: Callable[[str, Any], str]  # expected stdout for one stdin line
    params: Tuple[Any, ...]  # the values of {k}
    strings: bool = False  # the input is a word (else an integer)


def _letters(k: int) -> Tuple[str, ...]:
    return tuple(string.ascii_lowercase[:k])


_INT = "Write a Python program that reads an integer n and prints "
_STR = "Write a Python program that reads a line and prints "
_K = tuple(range(2, 100))  # two digits at most: a tiny model copies them reliably enough to learn from
FAMILIES: Dict[str, Family] = {
    "plus": Family(_INT + "n plus {k}", "n+{k}", "print(int(input())+{k})",
                   ("print(input()+'{k}')", "print(int(input())-{k})"), lambda s, k: str(int(s) + k), _K),
    "minus": Family(_INT + "n minus {k}", "n-{k}", "print(int(input())-{k})",
                    ("print({k}-int(input()))", "print(int(input())+{k})"), lambda s, k: str(int(s) - k), _K),
    "times": Family(_INT + "n times {k}", "n*{k}", "print(int(input())*{k})",
                    ("print(input()*{k})", "print(int(input())+{k})"), lambda s, k: str(int(s) * k), _K),
    "floordiv": Family(_INT + "n divided by {k}, rounded down", "n//{k}", "print(int(input())//{k})",
                       ("print(int(input())/{k})", "print(int(input())%{k})"), lambda s, k: str(int(s) // k), _K),
    "mod": Family(_INT + "the remainder of n divided by {k}", "n%{k}", "print(int(input())%{k})",
                  ("print(int(input())//{k})", "print({k}%int(input()))"), lambda s, k: str(int(s) % k), _K),
    "rminus": Family(_INT + "{k} minus n", "{k}-n", "print({k}-int(input()))",
                     ("print(int(input())-{k})", "print({k}+int(input()))"), lambda s, k: str(k - int(s)), _K),
    "square": Family(_INT + "n squared plus {k}", "n**2+{k}", "print(int(input())**2+{k})",
                     ("print(int(input())*2+{k})", "print(int(input())**2-{k})"),
                     lambda s, k: str(int(s) ** 2 + k), _K),
    "doubled": Family(_INT + "n plus {k}, doubled", "(n+{k})*2", "print((int(input())+{k})*2)",
                      ("print(int(input())+{k}*2)", "print(int(input())*2+{k})"),
                      lambda s, k: str((int(s) + k) * 2), _K),
    "halved": Family(_INT + "n plus {k}, halved and rounded down", "(n+{k})//2", "print((int(input())+{k})//2)",
                     ("print(int(input())+{k}//2)", "print((int(input())+{k})/2)"),
                     lambda s, k: str((int(s) + k) // 2), _K),
    "distance": Family(_INT + "the distance between n and {k}", "abs(n-{k})", "print(abs(int(input())-{k}))",
                       ("print(int(input())-{k})", "print(abs(int(input())+{k}))"),
                       lambda s, k: str(abs(int(s) - k)), _K),
    "first": Family(_STR + "its first {k} characters", "s[:{k}]", "print(input()[:{k}])",
                    ("print(input()[{k}:])", "print(input()[:-{k}])"), lambda s, k: s[:k], tuple(range(1, 10)),
                    strings=True),
    "last": Family(_STR + "its last {k} characters", "s[-{k}:]", "print(input()[-{k}:])",
                   ("print(input()[:-{k}])", "print(input()[{k}:])"), lambda s, k: s[-k:], tuple(range(1, 10)),
                   strings=True),
    "repeat": Family(_STR + "it {k} times, with nothing between", "s*{k}", "print(input()*{k})",
                     ("print(input()+'{k}')", "print(input())"), lambda s, k: s * k, tuple(range(2, 10)),
                     strings=True),
    "count": Family(_STR + "how many times the letter {k} occurs in it", "count {k}",
                    "print(input().count('{k}'))",
                    ("print(input().find('{k}'))", "print(input().index('{k}'))"),
                    lambda s, k: str(s.count(k)), tuple(string.ascii_lowercase), strings=True),
}


def _text(template: str, param: Any) -> str:
    return template.format(k=param)


def hidden_tests(family: str, param: Any) -> Dict[str, List[str]]:
    """The problem's stdin/stdout tests: deterministic in (family, param), and chosen so that every
    listed wrong program fails one (a long enough word for the slices, the letter first and absent)."""
    fam = FAMILIES[family]
    seed = int(hashlib.md5(json.dumps([family, param]).encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    if fam.strings:
        def word(low: int) -> str:
            size = int(rng.integers(low, _WORD_MAX + 1))
            return "".join(rng.choice(list(string.ascii_lowercase), size).tolist())

        longer = param + 2 if isinstance(param, int) else 3
        inputs = [word(longer), word(longer), word(1)]
        if family == "count":  # the letter first in one, absent from another, somewhere in the third
            inputs[0] = param + inputs[0][1:]
            inputs[1] = inputs[1].replace(param, "") or ("z" if param != "z" else "y")
            inputs[2] = inputs[2] + param + inputs[2]
    else:
        # a multiple of k (n / k prints as a float with ".0"), one above k, one below (the distance's sign)
        inputs = [str(param * int(rng.integers(2, min(param + 1, _NUMBER_MAX // param) + 1))),
                  str(int(rng.integers(param + 1, _NUMBER_MAX + 1))), str(int(rng.integers(0, param)))]
    return {"inputs": [i + "\n" for i in inputs], "outputs": [fam.solve(i, param) + "\n" for i in inputs]}


def code_problem(rng: np.random.Generator, families: str = ",".join(FAMILIES)) -> PromptRecord:
    """A random problem of the listed families (comma-separated names); its tests in metadata."""
    names = [f.strip() for f in families.split(",") if f.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if not names or unknown:
        raise ValueError(f"code: unknown families {unknown or families!r}; known: {', '.join(FAMILIES)}")
    name = names[int(rng.integers(len(names)))]
    fam = FAMILIES[name]
    param = fam.params[int(rng.integers(len(fam.params)))]
    tests = hidden_tests(name, param)
    answer = _text(fam.right, param)  # a reference solution; the tests decide, not this
    return PromptRecord("", _text(fam.spec, param), None, answer, "code",
                        {"family": name, "k": param, "tests": tests})


def code_key(record: PromptRecord) -> str:
    return json.dumps(["code", record.metadata["family"], record.metadata["k"]])


def worked_program(record: PromptRecord, correct: bool, rng: np.random.Generator) -> str:
    """A corpus response: the reasoning, then the right program or one of the family's slips."""
    m = record.metadata
    fam = FAMILIES[m["family"]]
    if correct:
        program = fam.right
    elif len(fam.wrong) == 1 or rng.random() < SLIP_SHARE:
        program = fam.wrong[0]
    else:
        program = fam.wrong[1 + int(rng.integers(len(fam.wrong) - 1))]
    # the program is the answer, with no answer tags, language tag or spaces in the reasoning: the default
    # run's 48 new tokens
    return f" <think> {_text(fam.think, m['k'])} </think> ```\n{_text(program, m['k'])}\n```"


def wrong_programs(family: str, param: Any) -> List[str]:
    """Every listed slip of a problem, as program text (for tests that check the hidden tests catch them)."""
    return [_text(w, param) for w in FAMILIES[family].wrong]
