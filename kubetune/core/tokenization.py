"""Tokenization for the training core: records -> token ids with labels on responses only, packed.

The ``tokenize_data`` stage runs it as a pipeline step; stages that tokenize and train inside
one task (a proposer of a mixture, the MoA aggregator) call it directly.

- Chat and instruction records go through the model's chat template (or a named default
  when the model has none); only assistant tokens carry labels, found by rendering the
  conversation up to each assistant turn and mapping character spans to tokens.
- Examples over ``max_length`` are dropped or truncated, with counts.
- Packing puts several short examples into one row (best-fit decreasing). Positions restart
  at 0 at each example, and the trainer passes ``position_ids`` without an attention mask,
  from which transformers builds a block-diagonal causal mask (sdpa/eager/flex) or uses
  variable-length kernels (flash attention): attention never crosses examples. The first
  token of each example carries no label, so no loss term reads across a boundary either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetune.core.config import setting
from kubetune.core.models import DEFAULT_BASE_MODEL, load_tokenizer
from kubetune.errors import ConfigError, StageError
from kubetune.lib.dataset import atomic_dir, load_dataset_dir, to_messages

IGNORE = -100
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_TEMPLATES = {"chatml": CHATML}


@dataclass
class TokenizeConfig:
    base_model: str = setting(DEFAULT_BASE_MODEL, "Model whose tokenizer (and chat template) to use.")
    max_length: int = setting(512, "Longest example, in tokens.")
    overlong: Literal["drop", "truncate"] = setting("drop", "Examples over max_length: drop them or cut them.")
    packing: bool = setting(True, "Pack short examples into rows of max_length tokens (no cross-attention).")
    chat_template: str = setting("auto", "'auto' = the model's own, else a named default ('chatml') when it has none.")
    trust_remote_code: bool = setting(False, "Run code shipped with the tokenizer (off unless you trust it).")
    method: str = setting("", "Training method the rows are for ('' = any); one that cannot train on packed "
                              "rows (prompt, prefix tuning) turns packing off.")

    def __post_init__(self):
        from kubetune.core.peft_methods import METHODS, training_flags_for

        if self.max_length < 8:
            raise ConfigError(f"'max_length' must be at least 8, got {self.max_length}")
        if self.chat_template not in ("auto", *DEFAULT_TEMPLATES):
            raise ConfigError(f"'chat_template' must be 'auto' or one of {list(DEFAULT_TEMPLATES)}, "
                              f"got {self.chat_template!r}")
        if self.method:
            if self.method not in METHODS:
                raise ConfigError(f"'method' must be one of {list(METHODS)} (or empty), got {self.method!r}")
            # Decided here, where the rows are made: the trainer refuses packed rows for such a method.
            self.packing = training_flags_for(self.method, gradient_checkpointing=False,
                                              packing=self.packing)["packing"]


def setup_tokenizer(cfg: TokenizeConfig):
    tok = load_tokenizer(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template != "auto":
        tok.chat_template = DEFAULT_TEMPLATES[cfg.chat_template]
    elif not tok.chat_template:
        tok.chat_template = CHATML  # the named default when the model has none
    return tok


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels on assistant turns only."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise StageError("the chat template does not render conversations as growing prefixes, so the "
                             "response span cannot be found; use chat_template='chatml' or another template")
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for j, (start, end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans) and end > start:
            labels[j] = ids[j]
    return ids, labels


def encode(tok, record: dict, shape: str) -> tuple[list[int], list[int]]:
    if shape in ("chat", "instruction"):
        return encode_chat(tok, to_messages(record, shape))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if shape == "text":
        ids = tok(record["text"], add_special_tokens=False)["input_ids"] + eos
        return ids, list(ids)
    if shape == "completion":
        p = tok(record["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(record["completion"], add_special_tokens=False)["input_ids"] + eos
        return p + c, [IGNORE] * len(p) + c
    raise StageError(f"shape '{shape}' is not for language-model training (it feeds reward_model, dpo or "
                     "train_head); use a pipeline made for it")


def pack(examples: list[tuple[list[int], list[int]]], row_length: int) -> list[dict]:
    """Best-fit-decreasing packing into rows of at most ``row_length`` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []  # indices of examples per row
    space: list[int] = []
    for i in order:
        n = len(examples[i][0])
        best = min((r for r in range(len(rows)) if space[r] >= n), key=lambda r: space[r], default=None)
        if best is None:
            rows.append([i])
            space.append(row_length - n)
        else:
            rows[best].append(i)
            space[best] -= n
    out = []
    for members in rows:
        ids, labels, pos = [], [], []
        for i in members:
            e_ids, e_labels = examples[i]
            ids += e_ids
            labels += [IGNORE] + e_labels[1:]  # never predict across an example boundary
            pos += list(range(len(e_ids)))
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def tokenize_split(tok, records: list[dict], shape: str, cfg: TokenizeConfig) -> tuple[list[dict], dict]:
    examples, counts = [], {"examples": len(records), "dropped_overlong": 0, "truncated": 0,
                            "dropped_no_response": 0}
    for rec in records:
        ids, labels = encode(tok, rec, shape)
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            counts["truncated"] += 1
        if sum(1 for x in labels[1:] if x != IGNORE) == 0:
            counts["dropped_no_response"] += 1
            continue
        examples.append((ids, labels))
    if records and not examples:
        reason = ("every example is longer than max_length" if counts["dropped_overlong"] == len(records)
                  else "no example has a response token to learn from: the response mask is empty "
                       "(check the chat template marks assistant turns, or raise max_length)")
        raise StageError(f"tokenize_data: {reason} ({counts})")
    if cfg.packing:
        rows = pack(examples, cfg.max_length)
    else:
        rows = [{"input_ids": i, "labels": lab, "position_ids": list(range(len(i)))} for i, lab in examples]
    counts["rows"] = len(rows)
    counts["tokens"] = sum(len(r["input_ids"]) for r in rows)
    counts["label_tokens"] = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in rows)
    return rows, counts


@dataclass
class TokenizeResult:
    counts: dict
    output_dir: str


def tokenize_dataset(cfg: TokenizeConfig, dataset_dir: str | Path, output_dir: str | Path) -> TokenizeResult:
    """Tokenize an ingested dataset folder into a packed ``datasets`` folder.

    Args:
        cfg: Tokenizer and packing settings.
        dataset_dir: Output folder of ``ingest``.
        output_dir: Where to save the ``DatasetDict`` (train/validation) and ``meta.json``.

    Returns:
        Counts per split (examples, dropped, truncated, rows, tokens, label tokens).
    """
    import datasets

    meta, train, val = load_dataset_dir(dataset_dir)
    tok = setup_tokenizer(cfg)
    train_rows, train_counts = tokenize_split(tok, train, meta["shape"], cfg)
    val_rows, val_counts = tokenize_split(tok, val, meta["shape"], cfg)
    counts = {"train": train_counts, "validation": val_counts}
    out_meta = {**meta, "tokenize": {**cfg.__dict__}, "token_counts": counts,
                "pad_token_id": tok.pad_token_id}
    with atomic_dir(output_dir) as tmp:
        datasets.DatasetDict({
            "train": datasets.Dataset.from_list(train_rows),
            "validation": datasets.Dataset.from_list(val_rows),
        }).save_to_disk(str(tmp))
        (tmp / "meta.json").write_text(json.dumps(out_meta, indent=2))
        tok.save_pretrained(tmp / "tokenizer")
    return TokenizeResult(counts=counts, output_dir=str(output_dir))
