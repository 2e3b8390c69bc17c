"""Generate the bundled preference data (RLHF, DPO) and the prompts PPO rolls out on.

Why this property: "chosen" answers are a short bulleted list of exactly three tips, one
per line, each starting with "- "; "rejected" answers carry the *same* tips as a rambling
paragraph. Content is held equal inside a pair, so the only signal a reward model can use
is the format, which is visible in a handful of tokens ("\\n- "), and a 135M instruction
model answers "how do I ..." questions with either shape, so a policy can be pushed toward
it. That makes the before/after numbers of PPO and DPO mean something on a CPU budget.

Files written next to this module:

- ``preferences.jsonl``: ``{"prompt", "chosen", "rejected"}`` rows (the foundation's
  preference shape); each prompt has three rows (different tips), kept adjacent.
- ``rollout_prompts.jsonl``: ``{"prompt"}`` rows for PPO rollouts and the win-rate
  evaluation, phrased with templates that the preference data never uses.

Run: python -m kubetune.data.make_preferences  (rewrites both files)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# goal -> tips, each tip an imperative sentence without the final period.
TOPICS = {
    "speed up a slow laptop": [
        "Restart it to clear stuck programs",
        "Uninstall apps you no longer use",
        "Turn off programs that start with the system",
        "Free up space on the disk",
        "Install the latest system updates",
        "Scan it for malware",
    ],
    "fix wifi that keeps dropping": [
        "Restart the router and the modem",
        "Move the router to an open, central spot",
        "Update the router firmware",
        "Switch to a less crowded channel",
        "Forget the network and join it again",
        "Keep the router away from the microwave",
    ],
    "get a printer to print again": [
        "Check that the printer is on and online",
        "Clear any jammed paper",
        "Cancel the stuck jobs in the print queue",
        "Reinstall the printer driver",
        "Replace the empty ink cartridge",
        "Connect it with a cable to test it",
    ],
    "make a phone battery last longer": [
        "Lower the screen brightness",
        "Turn on battery saver mode",
        "Close apps that run in the background",
        "Turn off location when you do not need it",
        "Keep the phone out of the heat",
        "Update the apps that drain power",
    ],
    "recover a forgotten password": [
        "Use the forgot password link on the login page",
        "Check the spam folder for the reset email",
        "Answer your security questions",
        "Contact support with proof of identity",
        "Pick a new password you have not used before",
        "Save it in a password manager",
    ],
    "deal with a late package": [
        "Check the tracking page for updates",
        "Look around the door and ask your neighbours",
        "Contact the shipping company",
        "Contact the seller with your order number",
        "Wait one more business day before you worry",
        "Ask for a refund or a replacement",
    ],
    "handle a double charge on a card": [
        "Check whether one charge is only a pending hold",
        "Find both charges on your statement",
        "Contact the seller with the order number",
        "Ask the seller for a refund of the extra charge",
        "Call your bank if the seller does not answer",
        "Keep copies of every receipt",
    ],
    "stop an app from crashing": [
        "Update the app to the latest version",
        "Restart the device",
        "Clear the app cache",
        "Reinstall the app",
        "Free up storage on the device",
        "Report the crash to the developer",
    ],
    "pair wireless headphones": [
        "Charge the headphones first",
        "Put them in pairing mode",
        "Turn on bluetooth on the device",
        "Remove old pairings from the device list",
        "Keep the headphones close to the device",
        "Restart both the headphones and the device",
    ],
    "sleep better": [
        "Go to bed at the same time every night",
        "Keep the bedroom dark and cool",
        "Avoid screens for an hour before bed",
        "Skip coffee after lunch",
        "Get some daylight in the morning",
        "Keep naps short",
    ],
    "save money on groceries": [
        "Plan your meals for the week",
        "Shop with a written list",
        "Buy store brands",
        "Cook in batches and freeze portions",
        "Avoid shopping when you are hungry",
        "Buy fruit and vegetables in season",
    ],
    "study for an exam": [
        "Start a few weeks early",
        "Test yourself instead of rereading",
        "Study in short sessions with breaks",
        "Work through old exam papers",
        "Explain each topic out loud",
        "Sleep well the night before",
    ],
    "start running": [
        "Begin with short runs mixed with walking",
        "Buy comfortable running shoes",
        "Run at a pace where you can still talk",
        "Add a little distance each week",
        "Rest at least one day between runs",
        "Stretch gently after each run",
    ],
    "keep houseplants alive": [
        "Water only when the top soil is dry",
        "Give each plant the light it needs",
        "Use pots with drainage holes",
        "Wipe dust off the leaves",
        "Feed them in spring and summer",
        "Keep them away from cold drafts",
    ],
    "write a clear email": [
        "Put the main point in the first line",
        "Write a specific subject line",
        "Keep paragraphs short",
        "Say exactly what you need and by when",
        "Cut words that add nothing",
        "Read it once before you send it",
    ],
    "prepare for a job interview": [
        "Research the company",
        "Practice answers to common questions",
        "Prepare two questions for the interviewer",
        "Plan your route and arrive early",
        "Bring a copy of your resume",
        "Send a thank you note afterwards",
    ],
    "reduce stress at work": [
        "Make a short list of priorities each morning",
        "Take short breaks away from the screen",
        "Say no to tasks you cannot take on",
        "Turn off notifications while you focus",
        "Go for a walk at lunch",
        "Talk to your manager about the workload",
    ],
    "learn a new language": [
        "Practice a little every day",
        "Learn the most common words first",
        "Listen to podcasts in the language",
        "Speak with native speakers early",
        "Label things at home with their names",
        "Watch shows with subtitles",
    ],
    "cook rice that is not sticky": [
        "Rinse the rice until the water runs clear",
        "Use the right amount of water",
        "Keep the lid on while it cooks",
        "Cook it on low heat",
        "Let it rest for ten minutes",
        "Fluff it with a fork before serving",
    ],
    "keep a laptop safe from viruses": [
        "Keep the system up to date",
        "Use the built in antivirus",
        "Do not open attachments you did not expect",
        "Download software only from official sites",
        "Use a different password for every account",
        "Back up your files every week",
    ],
}

# Preference prompts and rollout prompts use disjoint templates, so the evaluation asks
# questions phrased in a way the reward model and DPO never saw.
PREFERENCE_TEMPLATES = [
    "How can I {goal}?",
    "What should I do to {goal}?",
    "Any advice on how to {goal}?",
    "I want to {goal}. What do you suggest?",
    "Give me some tips to {goal}.",
    "What is the best way to {goal}?",
]
ROLLOUT_TEMPLATES = [
    "How do I {goal}?",
    "Can you help me {goal}?",
    "Tell me how to {goal}.",
    "What are good ways to {goal}?",
]

# The rejected paragraph: the same tips, wrapped in filler and joined into running prose.
PROSE_OPENERS = [
    "Well, there are a few things you could try here.",
    "Good question, this comes up a lot.",
    "That depends a little, but here is what usually works.",
    "Sure, I can help with that.",
    "There is no single answer, but some ideas might help.",
]
PROSE_JOINERS = [
    ("First of all you could {a}, and you might also {b}, and finally it is worth trying to {c}.",),
    ("You could {a}. Another idea is to {b}, and some people also like to {c}.",),
    ("It often helps to {a}, then {b}, and if nothing else works, {c}.",),
    ("Try to {a}, but also {b}, which people forget, and {c} as well.",),
]
PROSE_CLOSERS = [
    "I hope this helps and good luck with it!",
    "Let me know how it goes.",
    "In my experience that usually does the trick.",
    "",
]


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def bullets(tips: list[str]) -> str:
    """The preferred format: one "- " line per tip, nothing else."""
    return "\n".join(f"- {tip}." for tip in tips)


def prose(tips: list[str], rng: random.Random) -> str:
    """The dispreferred format: the same tips as one paragraph with filler."""
    a, b, c = (_lower_first(t) for t in tips)
    middle = rng.choice(PROSE_JOINERS)[0].format(a=a, b=b, c=c)
    parts = [rng.choice(PROSE_OPENERS), middle, rng.choice(PROSE_CLOSERS)]
    return " ".join(p for p in parts if p)


def make_pair(goal: str, template: str, rng: random.Random) -> dict:
    tips = rng.sample(TOPICS[goal], 3)
    # The group is the topic: ingest keeps each topic on one side of the split, so held-out pairs
    # ask about goals (and tips) that training never showed, in any phrasing.
    return {"prompt": template.format(goal=goal), "chosen": bullets(tips), "rejected": prose(tips, rng),
            "group": goal}


def generate(pairs_per_prompt: int = 3, seed: int = 11) -> list[dict]:
    """Every (goal, template) prompt with a few different tip samples: 20 × 6 × 3 = 360 rows.

    Rows of one prompt are kept adjacent *and* the whole list is shuffled by prompt, so a
    contiguous train/validation split puts each prompt on one side only.
    """
    rng = random.Random(seed)
    prompts = [(goal, t) for goal in TOPICS for t in PREFERENCE_TEMPLATES]
    rng.shuffle(prompts)
    rows = []
    for goal, template in prompts:
        seen = set()
        while len(seen) < pairs_per_prompt:
            row = make_pair(goal, template, rng)
            if row["chosen"] not in seen:
                seen.add(row["chosen"])
                rows.append(row)
    return rows


def rollout_prompts() -> list[dict]:
    """Every goal under every rollout template: 20 × 4 = 80 prompts, each with its goal as the
    group, so PPO can leave out the topics the evaluation holds out."""
    return [{"prompt": t.format(goal=goal), "group": goal} for t in ROLLOUT_TEMPLATES for goal in TOPICS]


def main() -> None:
    here = Path(__file__).parent
    for name, rows in (("preferences.jsonl", generate()), ("rollout_prompts.jsonl", rollout_prompts())):
        with (here / name).open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {here / name}")


if __name__ == "__main__":
    main()
