"""Generate the bundled Mixture-of-Agents dataset: route a support ticket to one of five teams.

Why this task: the answer is one word from a closed set (billing, hardware, software,
shipping, account), so the proposers' answers can be voted on after normalisation, and
accuracy leaves no room for judgement. The tickets are those of ``make_tickets`` (the same
templates, another seed), so a zero-shot 135M model gets some right from the wording alone
while a short LoRA run gets most: proposers of unequal quality, which is what a mixture
with fitted weights is for.

Run: python -m kubetune.data.make_moa  (rewrites moa.jsonl next to this file)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kubetune.data.make_tickets import ISSUES, make_ticket

TEAMS = sorted(ISSUES)  # account, billing, hardware, shipping, software
INSTRUCTION = f"Which team should handle this support ticket: {', '.join(TEAMS)}? Answer with the team name only."


def generate(n: int = 300, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        ticket = make_ticket(rng)
        if ticket["input"] in seen:  # no duplicate tickets: the split must not leak
            continue
        seen.add(ticket["input"])
        rows.append({"instruction": INSTRUCTION, "input": ticket["input"],
                     "output": json.loads(ticket["output"])["issue"], "group": ticket["group"]})
    return rows


def main() -> None:
    out = Path(__file__).with_name("moa.jsonl")
    with out.open("w") as f:
        for row in generate():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
