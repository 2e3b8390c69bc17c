"""Generate the bundled lm-eval benchmark: two-number arithmetic as four-way multiple choice.

Why this task: it needs no download and no licence (every item is generated here), it is
answerable from the question alone, a 135M instruction model scores well above chance on it
but far from perfect, and fine-tuning on an unrelated task can lower it, which is what the
"no benchmark drops" gate is for. The distractors are the answer off by a small amount, so the
choice is not guessable from the numbers' size alone.

Run: python -m kubetune.data.make_arithmetic  (rewrites arithmetic_mc.jsonl next to this file)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_ITEMS = 300
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def items(n: int = N_ITEMS, seed: int = 0) -> list[dict]:
    """``n`` questions, each with four distinct choices and the index of the right one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        op = rng.choice(sorted(OPS))
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 99), rng.randint(1, 49))
        right = OPS[op](a, b)
        wrong = set()
        while len(wrong) < 3:
            w = right + rng.choice([-10, -2, -1, 1, 2, 10])
            if w != right:
                wrong.add(w)
        choices = [right, *sorted(wrong)]
        rng.shuffle(choices)
        out.append({"id": i, "question": f"What is {a} {op} {b}?", "choices": [str(c) for c in choices],
                    "answer": choices.index(right)})
    return out


def main() -> None:
    path = Path(__file__).with_name("arithmetic_mc.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
