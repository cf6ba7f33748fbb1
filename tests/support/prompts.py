"""Code prompts for the tiny models (trained on Python): short, and some that repeat themselves,
so that model and n-gram drafters both get rounds with accepted drafts."""

CODE_PROMPTS = [
    "def main():",
    "import os\nimport sys\n",
    "class Foo(Bar):\n    def __init__(self",
    "x = [i * i for i in range(",
    "for i in range(10):\n    for i in range(10):\n        for i in range(",
    "return self._value\n\nreturn self._value\n\nreturn self.",
]
