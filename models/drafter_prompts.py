"""Training prompts for `sled models train-drafter`: the target answers them, the drafter learns
from those answers. Built from templates x subjects so they span what a coding assistant is asked
(code to write, code to edit, questions, rewrites) without copying any held-out benchmark prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

CODE_TASKS = (
    "reverses the words of a sentence",
    "checks whether a string is a palindrome, ignoring case and spaces",
    "returns the prime numbers below n with the sieve of Eratosthenes",
    "merges two sorted lists into one sorted list",
    "counts how often each word occurs in a text file",
    "flattens a nested list of arbitrary depth",
    "computes the factorial of n recursively",
    "finds the longest common prefix of a list of strings",
    "parses a CSV line that may contain quoted fields",
    "converts a Roman numeral to an integer",
    "returns the median of a list of numbers",
    "removes duplicates from a list while keeping the order",
    "performs binary search on a sorted list",
    "validates an email address with a regular expression",
    "groups a list of dictionaries by the value of one key",
    "computes the greatest common divisor of two integers",
    "transposes a matrix given as a list of lists",
    "reads a JSON file and returns the value at a dotted key path",
    "retries a function call up to three times with exponential backoff",
    "chunks a list into pieces of size n",
    "converts a temperature from Celsius to Fahrenheit and back",
    "computes the Levenshtein distance between two strings",
    "checks whether parentheses in a string are balanced",
    "implements a least-recently-used cache with a maximum size",
    "sorts a list of tuples by their second element",
    "walks a directory tree and returns the total size of all files",
    "formats a number of seconds as hours, minutes and seconds",
    "returns the n most common elements of a list",
    "rotates a list by k positions",
    "implements quicksort",
)
LANGUAGES = ("Python", "JavaScript", "Go", "Rust", "C", "TypeScript", "Java", "Bash")

CONCEPTS = (
    "a closure",
    "recursion",
    "a race condition",
    "dependency injection",
    "big-O notation",
    "a REST API",
    "garbage collection",
    "a mutex",
    "an index in a database",
    "the difference between a process and a thread",
    "a generator in Python",
    "a decorator in Python",
    "memoization",
    "a linked list",
    "a binary search tree",
    "unit testing",
    "a virtual environment",
    "the GIL in Python",
    "async and await",
    "a Git merge conflict",
    "TCP versus UDP",
    "a hash function",
    "immutability",
    "SQL joins",
    "a Docker container",
    "caching",
    "type hints",
    "exceptions",
    "a queue versus a stack",
    "floating point rounding errors",
)
QUESTION_FORMS = (
    "Explain {} to a beginner.",
    "What is {}? Give a short example.",
    "When should I use {}, and when not?",
    "Describe {} in two paragraphs.",
)

SNIPPETS = (
    "def total(items):\n    t = 0\n    for i in items:\n        t = t + i\n    return t",
    "def find(users, name):\n    for u in users:\n        if u['name'] == name:\n"
    "            return u\n    return None",
    "def read_lines(path):\n    f = open(path)\n    lines = f.readlines()\n    f.close()\n"
    "    return lines",
    "def average(xs):\n    return sum(xs) / len(xs)",
    "def squares(n):\n    result = []\n    for i in range(n):\n        result.append(i * i)\n"
    "    return result",
    "class Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self):\n"
    "        self.n += 1",
    "def is_even(n):\n    if n % 2 == 0:\n        return True\n    else:\n        return False",
    "def get(d, k):\n    if k in d:\n        return d[k]\n    return None",
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2));",
    "for i in range(len(names)):\n    print(i, names[i])",
)
EDIT_FORMS = (
    "Add a docstring and type hints to this code and return the whole code:\n\n```\n{}\n```",
    "Make this code more idiomatic and return only the new code:\n\n```\n{}\n```",
    "Add error handling to this code and return the full code:\n\n```\n{}\n```",
    "Write unit tests with pytest for this code:\n\n```\n{}\n```",
    "Explain what this code does, line by line:\n\n```\n{}\n```",
)

SENTENCES = (
    "the server crashed last night and nobody noticed until the morning",
    "we should probably move the meeting because half the team is on holiday",
    "the new version is way faster but it uses more memory",
    "please send me the report by friday or we will miss the deadline",
    "i think the bug is in the parser but i am not sure yet",
    "the app keeps logging me out every five minutes which is super annoying",
    "our sales went up a lot this quarter thanks to the new pricing",
    "can someone review my pull request, it has been waiting for a week",
    "the tests pass on my machine but fail on the build server",
    "we need to upgrade the database before the end of the month",
)
REWRITE_FORMS = (
    'Rewrite this sentence in a formal tone: "{}"',
    'Fix the grammar and punctuation of this sentence: "{}"',
    'Summarise this in five words or fewer: "{}"',
    'Turn this into a polite email of three sentences: "{}"',
)


def _dedupe(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def training_prompts(exclude: Iterable[str] = ()) -> list[str]:
    """All built-in training prompts, interleaved by kind, minus any prompt in `exclude`."""
    code = [
        f"Write a {lang} function that {task}."
        for i, task in enumerate(CODE_TASKS)
        for lang in (LANGUAGES[i % len(LANGUAGES)], "Python")
    ]
    questions = [
        form.format(c) for i, c in enumerate(CONCEPTS) for form in QUESTION_FORMS[i % 2 :: 2]
    ]
    edits = [form.format(s) for s in SNIPPETS for form in EDIT_FORMS]
    rewrites = [form.format(s) for s in SENTENCES for form in REWRITE_FORMS]
    kinds = [code, questions, edits, rewrites]
    interleaved = [k[i] for i in range(max(map(len, kinds))) for k in kinds if i < len(k)]
    banned = set(exclude)
    return [p for p in _dedupe(interleaved) if p not in banned]
