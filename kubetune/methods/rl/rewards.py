"""Reward functions for GRPO: a few verifiable checks, the reward model, and user functions.

A reward scores a batch of completions: ``fn(prompts, completions, references) -> scores``
(one float per completion; ``references`` holds the dataset's reference answer of each prompt,
or None). A reward spec names rewards with weights, ``"json_fields:1.0,format:0.2"``; the
total reward of a completion is the weighted sum. Built-in names:

- ``exact_match``: 1 if the completion equals the reference (JSON-aware, as ``evaluate``);
- ``json_fields``: share of the reference JSON object's fields the completion gets right;
- ``format``: 1 if the stripped completion matches a regular expression (``format_pattern``);
- ``length``: ``-max(0, len - max_chars) / max_chars``, capped at -1: a penalty for rambling;
- ``reward_model``: the score of a reward model trained by the ``reward_model`` stage.

Any other name is a user function given by import path (``mypkg.rewards.valid_sql``), with
the same signature; it runs only when ``allow_custom_rewards`` is on, like remote model code.

Every score is checked: a reward that raises or returns a non-finite value (NaN, inf) or the
wrong number of scores stops training with an error naming the reward and the dataset row.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kubetune.errors import ConfigError, StageError

RewardFn = Callable[[list[str], list[str], list["str | None"]], Sequence[float]]

# The check that parses JSON answers is evaluation's (kubetune.lib.text_metrics), so training and evaluation agree on "equal".
_JSON_OBJECT = r"\{.*\}"


def exact_match(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 where the completion equals the reference (as parsed JSON when the reference is JSON)."""
    from kubetune.lib.text_metrics import exact_match as same

    return [float(same(c, r)) for c, r in zip(completions, references)]


def json_fields(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """Share of the reference JSON object's fields that the completion (parsed as JSON) gets right."""
    from kubetune.lib.text_metrics import field_accuracy

    out = []
    for c, r in zip(completions, references):
        score = field_accuracy(c, r)
        if score is None:
            raise ValueError(f"the reference is not a JSON object: {r[:80]!r}")
        out.append(score)
    return out


# name -> (function, needs a reference answer)
BUILTIN: dict[str, tuple[RewardFn, bool]] = {
    "exact_match": (exact_match, True),
    "json_fields": (json_fields, True),
}
CONFIGURED = ("format", "length", "reward_model")  # built-ins whose behaviour comes from a setting


@dataclass
class RewardTerm:
    """One named, weighted reward of a spec."""

    name: str
    weight: float
    fn: RewardFn
    needs_reference: bool


@dataclass
class RewardSet:
    """The weighted rewards of a spec, called together with every score checked.

    Attributes:
        terms: The rewards and their weights, in spec order.
    """

    terms: list[RewardTerm] = field(default_factory=list)

    @property
    def needs_reference(self) -> list[str]:
        """Names of the rewards that compare against a reference answer."""
        return [t.name for t in self.terms if t.needs_reference]

    def check_references(self, references: list[str | None], where: Callable[[int], str]) -> None:
        """Fail before training if a reference reward meets a prompt that has no reference.

        Args:
            references: One per prompt (None or "" = no reference).
            where: Names row ``i`` for the message (file and line).
        """
        names = self.needs_reference
        for i, ref in enumerate(references):
            if names and (ref is None or not str(ref).strip()):
                raise StageError(f"reward '{names[0]}' needs a reference answer, but {where(i)} has none "
                                 "(use a dataset with references, e.g. prompt/completion rows, or a reward "
                                 "that needs none: format, length, reward_model)")

    def __call__(self, prompts: list[str], completions: list[str], references: list[str | None],
                 where: Callable[[int], str]) -> tuple[list[float], dict[str, list[float]]]:
        """Total reward per completion and each reward's own scores.

        Args:
            prompts: The user prompt of each completion.
            completions: Sampled completions (decoded text).
            references: The reference answer of each completion's prompt, or None.
            where: Names the dataset row of completion ``i`` for error messages.

        Raises:
            StageError: A reward raised, returned the wrong number of scores or a non-finite one.
        """
        per: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for t in self.terms:
            scores = _call_checked(t, prompts, completions, references, where)
            per[t.name] = scores
            total = [a + t.weight * s for a, s in zip(total, scores)]
        return total, per


def _call_checked(t: RewardTerm, prompts, completions, references, where) -> list[float]:
    try:
        scores = list(t.fn(prompts, completions, references))
    except Exception as batch_error:  # noqa: BLE001 - any user code may fail; find the row it fails on
        for i in range(len(completions)):
            try:
                t.fn(prompts[i:i + 1], completions[i:i + 1], references[i:i + 1])
            except Exception as e:  # noqa: BLE001
                raise StageError(f"reward '{t.name}' raised on {where(i)}: {type(e).__name__}: {e}") from None
        raise StageError(f"reward '{t.name}' raised on a batch of {len(completions)} completions: "
                         f"{type(batch_error).__name__}: {batch_error}") from None
    if len(scores) != len(completions):
        raise StageError(f"reward '{t.name}' returned {len(scores)} scores for {len(completions)} completions")
    out = []
    for i, s in enumerate(scores):
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise StageError(f"reward '{t.name}' returned {s!r} (not a number) on {where(i)}") from None
        if not math.isfinite(value):
            raise StageError(f"reward '{t.name}' returned {value} on {where(i)} (completion {completions[i][:60]!r})")
        out.append(value)
    return out


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"json_fields:1.0,format:0.2"`` -> ``[("json_fields", 1.0), ("format", 0.2)]`` (weight 1 if left out)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"'rewards': weight of '{name}' must be a number, got {weight!r}") from None
        if not math.isfinite(w):
            raise ConfigError(f"'rewards': weight of '{name}' must be finite, got {weight!r}")
        out.append((name.strip(), w))
    if not out:
        raise ConfigError("'rewards' names no reward; e.g. 'json_fields:1.0,format:0.2'")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"'rewards' names a reward twice: {spec!r}")
    return out


def check_spec(spec: str, allow_custom: bool) -> None:
    """Validate a spec without importing anything (for config construction)."""
    for name, _ in parse_spec(spec):
        if name in BUILTIN or name in CONFIGURED:
            continue
        if "." not in name or not all(p.isidentifier() for p in name.split(".")):
            raise ConfigError(f"'rewards': unknown reward '{name}'; built-in: "
                              f"{', '.join([*BUILTIN, *CONFIGURED])}, or an import path 'package.module.function'")
        if not allow_custom:
            raise ConfigError(f"'rewards': '{name}' is user code; it runs only with allow_custom_rewards=true")


def build(spec: str, *, allow_custom: bool = False, format_pattern: str = _JSON_OBJECT, max_chars: int = 200,
          reward_model: str | None = None, device: str | None = None) -> RewardSet:
    """The ``RewardSet`` of a spec.

    Args:
        spec: Comma-separated ``name[:weight]`` items.
        allow_custom: Allow rewards by import path (user code).
        format_pattern: Regular expression the ``format`` reward matches (whole, stripped completion).
        max_chars: Length in characters beyond which ``length`` penalises.
        reward_model: Folder of a reward model, for ``reward_model``.
        device: Where the reward model runs.
    """
    check_spec(spec, allow_custom)
    terms = []
    for name, weight in parse_spec(spec):
        if name in BUILTIN:
            fn, needs_ref = BUILTIN[name]
        elif name == "format":
            fn, needs_ref = _format_reward(format_pattern), False
        elif name == "length":
            fn, needs_ref = _length_penalty(max_chars), False
        elif name == "reward_model":
            if not reward_model:
                raise ConfigError("'rewards': 'reward_model' needs a reward model (the pipeline's reward_model input)")
            from kubetune.methods.rl.reward import RewardModelScorer

            scorer = RewardModelScorer(reward_model, device=device)
            fn, needs_ref = (lambda p, c, r: scorer(p, c)), False
        else:
            fn, needs_ref = _import(name), False
        terms.append(RewardTerm(name, weight, fn, needs_ref))
    return RewardSet(terms)


def _format_reward(pattern: str) -> RewardFn:
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"'format_pattern' is not a regular expression: {e}") from None

    def format_reward(prompts, completions, references):
        return [float(rx.fullmatch(c.strip()) is not None) for c in completions]

    return format_reward


def _length_penalty(max_chars: int) -> RewardFn:
    if max_chars < 1:
        raise ConfigError(f"'max_chars' must be >= 1, got {max_chars}")

    def length_penalty(prompts, completions, references):
        return [-min(1.0, max(0, len(c) - max_chars) / max_chars) for c in completions]

    return length_penalty


def _import(path: str) -> RewardFn:
    module, _, attr = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"'rewards': cannot import '{path}': {e}") from None
    if not callable(fn):
        raise ConfigError(f"'rewards': '{path}' is not callable")
    return fn

