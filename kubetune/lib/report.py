"""The evaluation report, ``eval.json``: what every evaluation stage writes and ``register`` reads.

Five stages evaluate a candidate (``evaluate``, ``evaluate_head``, ``evaluate_moa``,
``evaluate_policy``, ``reward_model``); each builds one ``EvalReport``: the candidate's, the
base's and the current champion's numbers on the same validation data, the primary metric that
decides, the margin, and forgetting. The verdict (does the candidate beat the base, the
champion) is not stored by hand: ``judge`` computes it from those numbers, with the one rule of
which direction is better (``better``), which the promotion gates use too.

On disk it is one flat JSON object (the keys the KFP UI, ``jq`` and the registry's tags show):
the fields below, the verdict (``higher_is_better``, ``beats_base``, ``beats_champion``) and a
method's own extras (``details``, e.g. the Mixture-of-Agents rows) beside them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import StageError
from kubetune.lib.dataset import atomic_file


def lower_is_better(metric: str) -> bool:
    """Whether ``metric`` falls as a model improves.

    Losses and perplexities do (``val_loss``, ``val_perplexity``, ``general_perplexity``, a
    Trainer's ``eval_loss``); every other metric kubetune reports rises (exact match, ROUGE-L,
    field accuracy, accuracy, macro-F1, reward, win rate, pattern rate, benchmark scores).
    """
    return metric.endswith(("loss", "perplexity"))


def better(a: float, b: float, metric: str, margin: float = 0.0) -> bool:
    """Whether score ``a`` beats score ``b`` on ``metric`` by more than ``margin`` (a tie never does)."""
    return a < b - margin if lower_is_better(metric) else a > b + margin


def numbers(scores: dict | None) -> dict[str, float]:
    """The numeric entries of a scores dict (drops samples, per-line lists and booleans)."""
    return {k: v for k, v in (scores or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class Verdict:
    """``EvalReport.judge``'s answer on the primary metric, with the report's margin."""

    higher_is_better: bool
    beats_base: bool
    beats_champion: bool  # True when there is no champion to beat (a first version)


# Written beside the fields for readers without this class; recomputed by ``judge``, never read back.
VERDICT_KEYS = ("higher_is_better", "beats_base", "beats_champion")


@dataclass
class EvalReport:
    """One evaluation: candidate vs base vs champion on the same validation data."""

    primary_metric: str  # the metric that decides promotion
    candidate: dict[str, Any]  # the candidate's scores (numbers; evaluate adds samples and per-line losses)
    base: dict | None = None  # the model it was trained from (MoA: best single proposer; head: majority class)
    champion: dict | None = None  # the current champion's scores on the same data; None = no champion
    champion_version: str | None = None  # the champion compared with; register moves the alias only from it
    min_improvement: float = 0.0  # margin the candidate must beat base and champion by
    forgetting: float | None = None  # general-text perplexity rise vs base (0.05 = 5%); None = not measured
    forgetting_ci_low: float | None = None  # 95% interval of forgetting, over the general text's lines
    forgetting_ci_high: float | None = None
    forgetting_lines: int | None = None
    data_fingerprint: str = ""  # the data evaluated on
    validation_fingerprint: str | None = None  # the validation split alone (the champion's numbers compare)
    eval_key: str | None = None  # validation rows + settings + code: equal keys mean reusable numbers
    validation_examples: int = 0
    benchmark_gate: str | None = None  # lm-eval benchmarks' verdict ("pass: ..." / "fail: ..."), when run
    # MoA: the best single proposer serving as base; the mixture trains nothing that could have
    # failed to learn, so check_gates lets a first version tie it rather than beat it.
    base_name: str | None = None
    evaluated: bool = True
    details: dict[str, Any] = field(default_factory=dict)  # a method's extras, written beside the fields

    def __post_init__(self):
        if isinstance(self.champion_version, int) and not isinstance(self.champion_version, bool):
            self.champion_version = str(self.champion_version)  # MLflow stores give int or str versions
        clash = sorted(set(self.details) & ({f.name for f in dataclasses.fields(self)} | set(VERDICT_KEYS)))
        if clash:
            raise ValueError(f"EvalReport details may not reuse the report's own keys {clash}")

    # ---------------------------------------------------------------- verdict

    def judge(self) -> Verdict:
        """Whether the candidate beats the base and the champion on the primary metric by the margin.

        Returns:
            The verdict. A side without the primary metric is not beaten; no champion at all is
            (there is nothing to beat).
        """
        m, margin = self.primary_metric, self.min_improvement
        cand = self.candidate.get(m)

        def beats(other: dict | None) -> bool:
            return cand is not None and other is not None and other.get(m) is not None and \
                better(cand, other[m], m, margin)

        return Verdict(higher_is_better=not lower_is_better(m), beats_base=beats(self.base),
                       beats_champion=self.champion is None or beats(self.champion))

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """The ``eval.json`` object: the fields, the verdict, then the method's extras."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        out.update(dataclasses.asdict(self.judge()))
        out.update(self.details)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "eval.json") -> EvalReport:
        """Build a report from an ``eval.json`` object, checking each field's type.

        Args:
            data: The object (unknown keys become ``details``; the verdict keys are recomputed).
            source: Named in errors (the file).

        Raises:
            StageError: One line naming ``source`` and the field that is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise StageError(f"evaluation report {source} must be a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "details"]
        values = {k: data[k] for k in names if k in data}
        if isinstance(values.get("champion_version"), int) and not isinstance(values["champion_version"], bool):
            values["champion_version"] = str(values["champion_version"])
        for required in ("primary_metric", "candidate"):
            if required not in values:
                raise StageError(f"evaluation report {source} has no '{required}'")
        for name, value in values.items():
            _check_field(source, name, value, hints[name])
        metric = values["primary_metric"]
        for side in ("candidate", "base", "champion"):
            scores = values.get(side) or {}
            if metric in scores and not _is_number(scores[metric]):
                raise StageError(f"evaluation report {source}: field '{side}.{metric}' must be a number, got "
                                 f"{_shown(scores[metric])}")
        details = {k: v for k, v in data.items() if k not in names and k not in VERDICT_KEYS}
        return cls(**values, details=details)

    def save(self, path: str | Path) -> Path:
        """Write ``eval.json`` atomically: serialised first, then a temporary file renamed over ``path``.

        A report that cannot be serialised raises before anything is written, and a write that
        fails leaves the previous file (or none) in place, never a half-written one.
        """
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2)
        with atomic_file(path) as tmp:
            tmp.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """Read a complete ``eval.json``: it exists, parses, its fields have their types, it says
        ``evaluated: true`` and the candidate has the primary metric.

        Raises:
            StageError: One line naming the file and what is missing or wrong.
        """
        path = Path(path)
        if not path.is_file():
            raise StageError(f"no evaluation report at {path} (the model is unevaluated)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise StageError(f"evaluation report {path} is not valid JSON ({where})") from None
        report = cls.from_dict(data, source=str(path))
        if not report.evaluated:
            raise StageError(f"evaluation report {path} is incomplete: field 'evaluated' is false")
        if report.primary_metric not in report.candidate:
            raise StageError(f"evaluation report {path} is incomplete: field 'candidate' has no primary metric "
                             f"{report.primary_metric!r}")
        return report

    # ---------------------------------------------------------------- tracking

    def metrics(self) -> dict[str, float]:
        """The report's numbers as flat metrics: ``candidate_<k>``, ``base_<k>``, ``champion_<k>``, forgetting."""
        out = {}
        for side in ("candidate", "base", "champion"):
            out.update({f"{side}_{k}": v for k, v in numbers(getattr(self, side)).items()})
        for k in ("forgetting", "forgetting_ci_low", "forgetting_ci_high", "forgetting_lines"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def log(self, tracking) -> None:
        """Log the primary metric (tag ``kubetune.primary_metric``) and ``metrics()`` to the active run.

        Args:
            tracking: ``kubetune.tracking``, handed in because ``kubetune.lib`` imports nothing
                above itself; only its ``set_tags`` and ``log_metrics`` are used.
        """
        tracking.set_tags({"kubetune.primary_metric": self.primary_metric})
        tracking.log_metrics(self.metrics())

    @classmethod
    def from_logged(cls, metrics: dict[str, float], primary_metric: str) -> EvalReport:
        """The report's numbers back from a run's logged ``metrics()`` (no verdict inputs beyond them)."""
        sides = {side: {k[len(side) + 1:]: v for k, v in metrics.items() if k.startswith(side + "_")}
                 for side in ("candidate", "base", "champion")}
        return cls(primary_metric=primary_metric, candidate=sides["candidate"], base=sides["base"] or None,
                   champion=sides["champion"] or None, forgetting=metrics.get("forgetting"),
                   forgetting_ci_low=metrics.get("forgetting_ci_low"),
                   forgetting_ci_high=metrics.get("forgetting_ci_high"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shown(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _check_field(source: str, name: str, value: Any, hint: Any) -> None:
    """Raise a one-line StageError unless ``value`` has the JSON kind of the field's annotation.

    Ours rather than ``kubetune.core.config.from_dict`` (a layer above this library) or pydantic
    (not a kubetune dependency): the report's fields are only strings, numbers, booleans and
    objects, some of them nullable.
    """
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    nullable = type(None) in args
    kinds = [typing.get_origin(a) or a for a in args if a is not type(None)]
    if value is None and nullable:
        return
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: _is_number(v) and isinstance(v, int),
          float: _is_number, str: lambda v: isinstance(v, str), dict: lambda v: isinstance(v, dict)}
    if any(ok[k](value) for k in kinds):
        return
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}
    want = " or ".join(words[k] for k in kinds) + (" or null" if nullable else "")
    raise StageError(f"evaluation report {source}: field '{name}' must be {want}, got {_shown(value)}")
