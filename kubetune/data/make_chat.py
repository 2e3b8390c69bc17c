"""Generate the bundled chat dataset: two-turn support-triage conversations.

Each conversation: the user pastes a support ticket and asks which team handles it; the
assistant answers with one word (billing, hardware, software, shipping, account); the user
asks how urgent it is; the assistant answers with one word (high, medium, low). Both
assistant turns are trained (multi-turn, response-only labels) and evaluation scores the
last one by exact match. A 135M instruction model answers in sentences ("This ticket should
go to ..."), so the base model scores near zero on exact match while a short tuning run
learns the one-word format and the mapping. The tickets are those of ``make_tickets``.

Run: python -m kubetune.data.make_chat  (rewrites chat.jsonl next to this file)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kubetune.data.make_tickets import ISSUES, OPENERS, PRODUCTS, SIGNOFFS, URGENCY

SYSTEM = "You triage support tickets. Answer every question with exactly one lowercase word."
ASK_TEAM = ["Which team should handle this ticket?", "Which team is this for?", "Route this ticket: which team?"]
ASK_URGENCY = ["How urgent is it?", "And the priority?", "What priority should it get?"]


def make_conversation(rng: random.Random) -> dict:
    product, issue, priority = rng.choice(sorted(PRODUCTS)), rng.choice(sorted(ISSUES)), rng.choice(sorted(URGENCY))
    body = rng.choice(ISSUES[issue]).format(p=rng.choice(PRODUCTS[product]))
    parts = [rng.choice(OPENERS), body[0].upper() + body[1:] + ".", rng.choice(URGENCY[priority]),
             rng.choice(SIGNOFFS)]
    ticket = " ".join(p for p in parts if p)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Ticket: {ticket}\n\n{rng.choice(ASK_TEAM)}"},
        {"role": "assistant", "content": issue},
        {"role": "user", "content": rng.choice(ASK_URGENCY)},
        {"role": "assistant", "content": priority},
    ], "group": f"{product}/{issue}/{priority}"}  # the tickets' group: see make_tickets


def generate(n: int = 400, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        row = make_conversation(rng)
        key = row["messages"][1]["content"].split("\n\n")[0]  # the ticket alone
        if key not in seen:  # no duplicate tickets: the split must not leak
            seen.add(key)
            rows.append(row)
    return rows


def main() -> None:
    out = Path(__file__).with_name("chat.jsonl")
    with out.open("w") as f:
        for row in generate():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
