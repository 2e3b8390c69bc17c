"""Generate the bundled task dataset: free-text support tickets -> a strict JSON record.

Why this task: a 135M instruction model reads the tickets fine but does not produce the
exact record (key names, the closed vocabularies, the urgency mapping), so the base model
measurably fails on exact match while a short LoRA run learns the mapping. The labels are
determined by the text (product named, issue described, urgency cues), so the task is
learnable, and the metric (exact match of the parsed fields) leaves no room for judgement.

Run: python -m kubetune.data.make_tickets  (rewrites tickets.jsonl next to this file)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = (
    "Ticket to JSON with keys product, issue (billing, hardware, software, shipping or account) "
    "and priority (high, medium or low)."
)

PRODUCTS = {
    "router": ["router", "wifi router", "internet router", "home router"],
    "laptop": ["laptop", "notebook", "laptop computer"],
    "phone": ["phone", "smartphone", "mobile phone"],
    "printer": ["printer", "inkjet printer", "office printer"],
    "headphones": ["headphones", "wireless headphones", "headset"],
    "tablet": ["tablet", "drawing tablet", "tablet computer"],
}

ISSUES = {
    "billing": [
        "I was charged twice for my {p} this month",
        "the invoice for my {p} shows the wrong amount",
        "I still have not received the refund for the {p} I returned",
        "my card was billed for a {p} subscription I cancelled",
    ],
    "hardware": [
        "the screen of my {p} is cracked",
        "my {p} will not power on anymore",
        "the battery of my {p} drains in an hour",
        "a button on the {p} is broken and stuck",
    ],
    "software": [
        "the app for my {p} keeps crashing after the update",
        "my {p} is stuck in a boot loop after the firmware update",
        "the settings page of the {p} shows an error code",
        "the driver for my {p} fails to install",
    ],
    "shipping": [
        "the {p} I ordered two weeks ago has not arrived",
        "the tracking number for my {p} does not work",
        "my {p} was delivered to the wrong address",
        "the box with my {p} arrived empty",
    ],
    "account": [
        "I cannot log in to the account I use for my {p}",
        "the password reset email for my {p} account never comes",
        "my {p} account was locked after too many attempts",
        "I want to change the email on the account linked to my {p}",
    ],
}

URGENCY = {
    "high": [
        "This is urgent, my business depends on it.",
        "Please fix this ASAP, I cannot work.",
        "I need this solved today, it is critical.",
        "Emergency: we are losing customers because of this.",
    ],
    "medium": [
        "Could you look into it this week?",
        "Please let me know what to do next.",
        "I would appreciate your help with this.",
        "What are my options?",
    ],
    "low": [
        "No rush, whenever you get a chance.",
        "It is not urgent at all.",
        "Just letting you know, low priority for me.",
        "Whenever convenient, thanks.",
    ],
}

OPENERS = ["Hello,", "Hi team,", "Hi,", "Good morning,", "Dear support,", ""]
SIGNOFFS = ["Thanks, Sam", "Regards, Alex", "Best, Jordan", "Cheers", "Thank you", ""]


def make_ticket(rng: random.Random) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    issue = rng.choice(sorted(ISSUES))
    priority = rng.choice(sorted(URGENCY))
    body = rng.choice(ISSUES[issue]).format(p=rng.choice(PRODUCTS[product]))
    parts = [rng.choice(OPENERS), body[0].upper() + body[1:] + ".", rng.choice(URGENCY[priority]),
             rng.choice(SIGNOFFS)]
    text = " ".join(p for p in parts if p)
    record = {"product": product, "issue": issue, "priority": priority}
    # The group is the answer: ingest keeps each group on one side of the split, so every
    # validation ticket asks for a combination of fields that training never showed as a whole
    # (each field's values are all in training), and recalling a memorised record cannot score.
    return {"instruction": INSTRUCTION, "input": text, "output": json.dumps(record),
            "group": f"{product}/{issue}/{priority}"}


def generate(n: int = 480, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        row = make_ticket(rng)
        if row["input"] not in seen:  # no duplicate tickets: the split must not leak
            seen.add(row["input"])
            rows.append(row)
    return rows


def main() -> None:
    out = Path(__file__).with_name("tickets.jsonl")
    with out.open("w") as f:
        for row in generate():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
