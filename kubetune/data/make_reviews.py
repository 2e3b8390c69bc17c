"""Generate the bundled classification dataset: short product reviews -> sentiment label.

Why this task: the feature-extraction pipeline needs text/label rows that a frozen encoder's
embeddings separate, so a trained head beats the majority-class baseline by a clear margin
in seconds of training. Three labels (positive,
negative, neutral); the label follows from the wording (praise, complaint, or a flat
statement of fact), and products, aspects and sentence frames vary independently of it, so
no single word gives the label away.

Run: python -m kubetune.data.make_reviews  (rewrites reviews.jsonl next to this file)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = ["blender", "desk lamp", "backpack", "coffee maker", "keyboard", "running shoes", "tent",
            "vacuum cleaner", "water bottle", "office chair", "toaster", "bike light", "phone case",
            "rice cooker", "electric kettle", "yoga mat"]
ASPECTS = ["the build quality", "the battery", "the price", "the delivery", "the design", "the noise level",
           "the instructions", "the size", "the material", "the customer service"]

PHRASES = {
    "positive": [
        "I love this {p}, {a} is excellent.",
        "Really happy with the {p}; {a} exceeded my expectations.",
        "Great {p}. {a} is superb and it works perfectly.",
        "Best purchase this year, {a} of this {p} is fantastic.",
        "The {p} is wonderful and {a} is better than I hoped.",
        "Highly recommend this {p}: {a} is outstanding.",
        "Five stars. {a} makes this {p} a joy to use.",
        "Impressed by the {p}, {a} is top notch.",
    ],
    "negative": [
        "I regret buying this {p}, {a} is terrible.",
        "Very disappointed with the {p}; {a} is awful.",
        "The {p} broke within a week and {a} is a joke.",
        "Do not buy this {p}. {a} is the worst I have seen.",
        "Returned the {p} because {a} was unacceptable.",
        "One star. {a} of this {p} is frustrating and cheap.",
        "The {p} is useless and {a} made it even worse.",
        "Poor {p}, {a} fell apart almost immediately.",
    ],
    "neutral": [
        "The {p} arrived on Tuesday; {a} is as described.",
        "It is a {p}. {a} is about what you would expect for the category.",
        "The {p} does what it says, {a} is average.",
        "Bought the {p} last month. {a} is okay, nothing special.",
        "The {p} is fine; {a} is neither good nor bad.",
        "Standard {p}. {a} matches the product page.",
        "Using the {p} daily, {a} is acceptable.",
        "The {p} came in a grey box and {a} is ordinary.",
    ],
}
TAILS = ["", "", "Bought it as a gift.", "Used it for two weeks.", "Ordered online.", "Second one I own.",
         "My partner uses it too.", "Got it on sale."]


def make_review(rng: random.Random) -> dict:
    label = rng.choice(sorted(PHRASES))
    frame = rng.choice(PHRASES[label])
    product = rng.choice(PRODUCTS)
    text = frame.format(p=product, a=rng.choice(ASPECTS))
    text = text[0].upper() + text[1:]
    tail = rng.choice(TAILS)
    # The group is the product: ingest keeps each product's reviews on one side of the split, so
    # the head is scored on reviews of products it never saw (every label occurs for every product).
    return {"text": f"{text} {tail}".strip(), "label": label, "group": product}


def generate(n: int = 360, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        row = make_review(rng)
        if row["text"] not in seen:  # no duplicates: the split must not leak
            seen.add(row["text"])
            rows.append(row)
    return rows


def main() -> None:
    out = Path(__file__).with_name("reviews.jsonl")
    with out.open("w") as f:
        for row in generate():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
