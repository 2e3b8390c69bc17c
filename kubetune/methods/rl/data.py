"""Preference data for the RLHF and DPO stages: reading an ingested folder, prompt-grouped
splits, the SFT view of preference pairs (prompt -> chosen) and rollout prompts.
"""

from __future__ import annotations

from pathlib import Path


def grouped_by_prompt(train: list[dict], val: list[dict]) -> tuple[list[dict], list[dict]]:
    """Move training pairs whose prompt also appears in validation over to validation.

    Rows of one prompt must not straddle the split: a held-out accuracy (or win rate) on a
    prompt the model trained on measures memory, not the preference. ``ingest`` with
    ``group_by=prompt`` already splits that way, and then this is a no-op; with a row-by-row
    split it repairs it, keeping the validation side (so it only grows).
    """
    held_out = {r["prompt"] for r in val}
    moved = [r for r in train if r["prompt"] in held_out]
    if not moved:
        return train, val
    return [r for r in train if r["prompt"] not in held_out], val + moved


def load_pairs(dataset_dir: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """(meta, train pairs, validation pairs) of an ingested preference dataset, prompt-grouped."""
    from kubetune.errors import DataError
    from kubetune.lib.dataset import load_dataset_dir

    meta, train, val = load_dataset_dir(dataset_dir)
    if meta.get("shape") != "preference":
        raise DataError(f"{dataset_dir}: needs preference data (prompt/chosen/rejected), got shape "
                        f"'{meta.get('shape')}'")
    train, val = grouped_by_prompt(train, val)
    if not train or not val:
        raise DataError(f"{dataset_dir}: after keeping each prompt's pairs on one side, train has "
                        f"{len(train)} and validation {len(val)} pairs; both must be non-empty")
    return meta, train, val


def prompt_half(pairs: list[dict], half: str) -> list[dict]:
    """The pairs whose prompt falls in one of two disjoint halves: "policy", "judge" or "all".

    A policy optimised against a reward model learns that model's blind spots, so the model that
    judges it must not have seen the same pairs. The halves are cut by a stable hash of the
    prompt (not by position), so every pair of one prompt lands on the same side whatever the
    row order, and the same prompt always lands on the same side.
    """
    import hashlib

    if half == "all":
        return pairs
    if half not in ("policy", "judge"):
        raise ValueError(f"half must be 'all', 'policy' or 'judge', got {half!r}")
    want = 0 if half == "policy" else 1
    return [p for p in pairs if hashlib.sha256(p["prompt"].encode()).digest()[0] % 2 == want]


def spread(rows: list[dict], n: int) -> list[dict]:
    """At most ``n`` of ``rows``, evenly spaced (so a capped evaluation still covers many prompts); 0 = all."""
    if n <= 0 or len(rows) <= n:
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def unique_prompts(pairs: list[dict]) -> list[str]:
    """Prompts of ``pairs`` in first-seen order, each once."""
    return list(dict.fromkeys(p["prompt"] for p in pairs))


def chosen_as_instruction(dataset_dir: str | Path, output_dir: str | Path) -> dict:
    """Write the SFT view of an ingested preference dataset: ``prompt -> chosen`` instruction records.

    The output is an ingested dataset folder (``train.jsonl``, ``validation.jsonl``,
    ``meta.json`` with shape ``instruction``) that ``tokenize_data`` and the training core take
    as they are. Supervised fine-tuning on the preferred answers before reward modelling and
    PPO is the InstructGPT recipe (Ouyang et al. 2022, step 1).

    Returns:
        The written ``meta.json`` content.
    """
    from kubetune.lib.dataset import fingerprint, write_dataset_dir

    meta, train, val = load_pairs(dataset_dir)

    def view(pairs):
        return [{"instruction": p["prompt"], "input": "", "output": p["chosen"]} for p in pairs]

    train_sft, val_sft = view(train), view(val)
    out = {"shape": "instruction", "fingerprint": fingerprint(train_sft + val_sft),
           "counts": {"train": len(train_sft), "validation": len(val_sft)},
           "source": f"{meta.get('source', '')} (prompt -> chosen)", "seed": meta.get("seed", 0)}
    write_dataset_dir(output_dir, out, train_sft, val_sft)
    return out


def load_prompts(uri: str, cache_dir: str | Path, held_out: list[dict] = ()) -> list[str]:
    """User prompts from a JSONL of ``{"prompt": ...}`` rows (any data URI ``ingest`` takes).

    Args:
        uri: The prompts' data URI; a row may carry a ``group`` (its topic) as preference rows do.
        cache_dir: Where a remote file is fetched to.
        held_out: The validation rows the policy is judged on. Rollout prompts that repeat one of
            their prompts, or share one of their groups, are dropped: a policy trained on the
            held-out topics would be judged on what it rehearsed.

    Raises:
        DataError: a row without a non-empty string prompt, or no prompt left after the drop.
    """
    from kubetune.lib import storage
    from kubetune.errors import DataError
    from kubetune.lib.dataset import read_jsonl

    rows = read_jsonl(storage.fetch(uri, cache_dir))
    good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str) and r["prompt"].strip()]
    if len(good) != len(rows) or not good:
        raise DataError(f"{uri}: every row must be an object with a non-empty string 'prompt' "
                        f"({len(good)} of {len(rows)} are)")
    texts = {r["prompt"].strip() for r in held_out}
    groups = {str(r["group"]) for r in held_out if r.get("group") not in (None, "")}
    kept = [r["prompt"] for r in good
            if r["prompt"].strip() not in texts and str(r.get("group", "")) not in groups]
    if not kept:
        raise DataError(f"{uri}: every rollout prompt repeats a held-out prompt or topic ('group'); "
                        f"roll out on prompts about other topics")
    return kept


def policy_folder(ref: str | Path) -> str:
    """A plain causal-LM folder for a policy reference.

    A training stage's output folder with a ``merged/`` subfolder (LoRA SFT saved with
    ``merge=True``) gives that; a folder with ``config.json`` is used as it is; anything else is
    a model reference (``kubetune.core.models.resolve``).
    """
    from kubetune.core import models

    path = Path(str(ref))
    if (path / "merged" / "config.json").exists():
        return str(path / "merged")
    return models.resolve(str(ref))
