"""Mixture of Agents: several proposer LLMs answer, an aggregator combines their answers.

Experimental (issue 6). The pieces, each usable alone:

* **Proposers** answer a chat conversation and return a :class:`Completion`.
  :class:`LocalProposer` runs a transformers folder (or a GGUF file) in-process,
  :class:`RegistryProposer` downloads a model registered in MLflow and runs it the same way,
  :class:`HttpProposer` calls an OpenAI-compatible ``/v1/chat/completions`` endpoint, which is
  how models served by vLLM or KServe are reached in practice.
* :func:`ask_all` calls proposers concurrently with one deadline; a proposer that fails or
  misses the deadline is dropped and named in the result, so a mixture never hangs on one
  slow member.
* **Aggregation**: :func:`majority_vote` over normalised answers; :func:`weighted_vote` with
  weights from :func:`fit_weights` (the "tuning at the aggregator level", fitted on
  validation answers); :func:`synthesize`, where an aggregator LLM reads the proposals
  under the aggregate-and-synthesise prompt of Wang et al. 2024 (arXiv:2406.04692), over
  one or more layers.
* :func:`build_aggregator_examples` turns (prompt, proposals, reference) into chat records
  ``{"messages": [...]}`` for the LoRA training core, so the aggregator can be fine-tuned on
  exactly the messages :func:`synthesize` sends it.
* :func:`mixture_answer` is one question through the whole mixture; the MLflow pyfunc in
  :mod:`kubetune.methods.moa_pyfunc` calls it for each row.
"""

from __future__ import annotations

import json
import math
import re
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Messages = list[dict[str, str]]

# The aggregate-and-synthesise prompt, word for word from Table 1 of Wang et al. 2024,
# "Mixture-of-Agents Enhances Large Language Model Capabilities" (arXiv:2406.04692). It goes
# in the system message, followed by the numbered responses; the user's query stays the
# user message, as in the paper's reference implementation.
AGGREGATE_PROMPT = (
    "You have been provided with a set of responses from various open-source models to the "
    "latest user query. Your task is to synthesize these responses into a single, "
    "high-quality response. It is crucial to critically evaluate the information provided in "
    "these responses, recognizing that some of it may be biased or incorrect. Your response "
    "should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction. Ensure your response is well-structured, "
    "coherent, and adheres to the highest standards of accuracy and reliability.\n\n"
    "Responses from models:"
)

MODES = ("majority", "weighted", "synthesis")


# --------------------------------------------------------------------------------------
# Proposers
# --------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One proposer's answer to one conversation.

    Attributes:
        text: The generated text, special tokens removed.
        tokens: Tokens generated (the cost measure the evaluation reports).
        latency_s: Wall time of the call, in seconds.
    """

    text: str
    tokens: int = 0
    latency_s: float = 0.0


class Proposer(Protocol):
    """Anything with a ``name`` that answers a conversation."""

    name: str

    def __call__(self, messages: Messages, max_new_tokens: int | None = None) -> Completion: ...


def as_messages(prompt: str | Messages) -> Messages:
    """A bare prompt becomes a one-turn user conversation; a conversation passes through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _find_model_dirs(root: Path, gguf_file: str | None) -> tuple[Path, Path]:
    """The folder holding the weights and the one holding the tokenizer under ``root``.

    A plain ``save_pretrained`` folder holds both; MLflow's transformers flavour keeps the
    weights in ``model/`` and the tokenizer in ``components/tokenizer/``, and a registered
    artifact may wrap either one level deeper, so look for the shallowest match.
    """
    if gguf_file or (root / "config.json").exists():
        return root, root

    def shallowest(pattern: str) -> Path | None:
        hits = sorted(root.rglob(pattern), key=lambda p: len(p.parts))
        return hits[0].parent if hits else None

    weights = shallowest("config.json")
    tokenizer = shallowest("tokenizer_config.json") or weights
    if weights is None:
        raise FileNotFoundError(f"no transformers model (config.json) under {root}")
    return weights, tokenizer


class LocalProposer:
    """A transformers model folder answering in-process with greedy decoding.

    Greedy, because a proposer that answers differently on every call cannot be evaluated
    or voted on reproducibly. The model loads on first use, so building a mixture is cheap
    and only the proposers actually asked pay for loading.

    Args:
        path: A ``save_pretrained`` folder (or a folder holding ``gguf_file``); a folder a
            kubetune training stage wrote (an adapter and its ``kubetune_method.json``, loaded
            onto the base model the manifest names); or a model reference
            :func:`kubetune.core.models.resolve` takes, e.g. the packaged ``smollm2-135m-instruct``.
        name: Name used in results; defaults to the folder name.
        max_new_tokens: Default generation budget per answer.
        gguf_file: File name of a GGUF checkpoint inside ``path`` (transformers dequantises
            it), e.g. the packaged ``SmolLM2-135M-Instruct.Q4_1.gguf``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        max_new_tokens: int = 64,
        gguf_file: str | None = None,
    ):
        self.path = Path(path)
        self.name = name or self.path.name
        self.max_new_tokens = max_new_tokens
        self.gguf_file = gguf_file
        self._model = None
        self._tokenizer = None
        # One generate() at a time per model: concurrent calls on one module would only
        # fight for the same cores, and different proposers still run in parallel.
        self._lock = threading.Lock()

    def load(self) -> LocalProposer:
        """Load the model and tokenizer now (otherwise done on the first call)."""
        if self._model is not None:
            return self
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = self.path
        if not root.exists():
            from kubetune.core.models import resolve

            root = Path(resolve(str(self.path)))  # a packaged name or hub id
        if not self.gguf_file and not (root / "config.json").exists() and (root / "kubetune_method.json").exists():
            # An adapter written by a kubetune training stage: load it onto its base model
            # the way evaluate does, then fold LoRA weights in (same answers, faster).
            from kubetune.core.scoring import load_model_artifact

            tokenizer = AutoTokenizer.from_pretrained(root)
            model = load_model_artifact(root)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
        else:
            model_dir, tokenizer_dir = _find_model_dirs(root, self.gguf_file)
            kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Left padding: in a batch every prompt must end where generation starts.
        tokenizer.padding_side = "left"
        self._tokenizer, self._model = tokenizer, model
        return self

    def __call__(self, messages: Messages, max_new_tokens: int | None = None) -> Completion:
        """Answer one conversation."""
        return self.batch([messages], max_new_tokens=max_new_tokens)[0]

    def batch(
        self,
        conversations: Sequence[Messages],
        max_new_tokens: int | None = None,
        batch_size: int = 8,
    ) -> list[Completion]:
        """Answer many conversations, ``batch_size`` at a time (much cheaper than one by one).

        Args:
            conversations: Chat conversations, each ending with the user turn to answer.
            max_new_tokens: Generation budget; defaults to the proposer's.
            batch_size: Conversations per ``generate`` call.

        Returns:
            One :class:`Completion` per conversation, in order; ``latency_s`` is the batch's
            wall time shared out evenly.
        """
        import torch

        self.load()
        tok, model = self._tokenizer, self._model
        budget = max_new_tokens or self.max_new_tokens
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        results: list[Completion] = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [
                tok.apply_chat_template(as_messages(c), add_generation_prompt=True, tokenize=False)
                for c in chunk
            ]
            # The chat template already wrote any BOS token; adding another shifts the prompt.
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            t0 = time.perf_counter()
            with self._lock, torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=budget,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            latency = (time.perf_counter() - t0) / len(chunk)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                # Cost = tokens up to and including the first end-of-sequence; the rest of
                # the row is padding from longer answers in the same batch.
                n = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
                text = tok.decode(row[:n], skip_special_tokens=True).strip()
                results.append(Completion(text=text, tokens=n, latency_s=latency))
        return results


class RegistryProposer:
    """A model registered in MLflow, downloaded once and run like a :class:`LocalProposer`.

    The alias is resolved to a version number when the proposer is built, so a mixture keeps
    answering with the version it was evaluated with even if the alias later moves.

    Args:
        uri: ``models:/name@alias`` or ``models:/name/version``.
        name: Name used in results; defaults to the URI.
        max_new_tokens: Default generation budget per answer.
        dst_path: Where to download; defaults to an MLflow temporary folder.
    """

    def __init__(
        self,
        uri: str,
        *,
        name: str | None = None,
        max_new_tokens: int = 64,
        dst_path: str | Path | None = None,
    ):
        self.uri = uri
        self.resolved_uri = resolve_model_uri(uri)
        self.name = name or uri
        self.max_new_tokens = max_new_tokens
        self.dst_path = dst_path
        self._local: LocalProposer | None = None

    def load(self) -> RegistryProposer:
        """Download the registered artifact and load it (otherwise done on the first call)."""
        if self._local is None:
            import mlflow

            local = mlflow.artifacts.download_artifacts(
                artifact_uri=self.resolved_uri,
                dst_path=str(self.dst_path) if self.dst_path else None,
            )
            path = Path(local)
            ggufs = sorted(path.rglob("*.gguf"))
            gguf = ggufs[0] if ggufs and not list(path.rglob("config.json")) else None
            self._local = LocalProposer(
                gguf.parent if gguf else path,
                name=self.name,
                max_new_tokens=self.max_new_tokens,
                gguf_file=gguf.name if gguf else None,
            ).load()
        return self

    def __call__(self, messages: Messages, max_new_tokens: int | None = None) -> Completion:
        """Answer one conversation."""
        return self.load()._local(messages, max_new_tokens)

    def batch(self, conversations: Sequence[Messages], max_new_tokens: int | None = None, batch_size: int = 8):
        """Answer many conversations; see :meth:`LocalProposer.batch`."""
        return self.load()._local.batch(conversations, max_new_tokens, batch_size)


def resolve_model_uri(uri: str) -> str:
    """``models:/name@alias`` → ``models:/name/<version the alias points to now>``."""
    match = re.fullmatch(r"models:/([^/@]+)@(.+)", uri)
    if not match:
        return uri
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias(match.group(1), match.group(2)).version
    return f"models:/{match.group(1)}/{version}"


class HttpProposer:
    """An OpenAI-compatible chat endpoint (vLLM, KServe's OpenAI route, ``kubetune.serving.serve``).

    Uses the standard library: no retries (a retry would hide the slowness the mixture's
    deadline is there to catch) and a socket timeout on every call.

    Args:
        base_url: Server root, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added if missing).
        model: The ``model`` field of the request (the served model's id).
        timeout: Seconds before the call is abandoned and raises ``TimeoutError``.
        name: Name used in results; defaults to ``model``.
        max_new_tokens: Default ``max_tokens`` per answer.
        api_key: Sent as a bearer token when given.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 60.0,
        name: str | None = None,
        max_new_tokens: int = 64,
        api_key: str | None = None,
    ):
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.timeout = timeout
        self.name = name or model
        self.max_new_tokens = max_new_tokens
        self.api_key = api_key

    def __call__(self, messages: Messages, max_new_tokens: int | None = None) -> Completion:
        """Answer one conversation with one POST to ``/v1/chat/completions``."""
        body = {
            "model": self.model,
            "messages": as_messages(messages),
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": 0.0,  # greedy, as for local proposers
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.base_url + "/chat/completions", data=json.dumps(body).encode(), headers=headers
        )
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.URLError as err:
            # urllib wraps socket timeouts in URLError; surface them as what they are.
            if isinstance(err.reason, TimeoutError):
                raise TimeoutError(f"{self.name}: no answer within {self.timeout}s") from err
            raise
        text = payload["choices"][0]["message"]["content"] or ""
        tokens = int((payload.get("usage") or {}).get("completion_tokens") or 0)
        return Completion(text=text.strip(), tokens=tokens, latency_s=time.perf_counter() - t0)


def proposer_from_spec(spec: Mapping[str, Any]) -> Proposer:
    """Build a proposer from its JSON description (pipeline parameters, pyfunc config).

    Args:
        spec: ``{"kind": "local", "path", ["name", "gguf_file", "max_new_tokens"]}``,
            ``{"kind": "registry", "uri", ["name", "max_new_tokens"]}`` or
            ``{"kind": "http", "base_url", "model", ["timeout", "name", "max_new_tokens"]}``.

    Returns:
        The proposer (not loaded yet).
    """
    kind = spec.get("kind")
    common = {k: spec[k] for k in ("name", "max_new_tokens") if spec.get(k) is not None}
    if kind == "local":
        return LocalProposer(spec["path"], gguf_file=spec.get("gguf_file"), **common)
    if kind == "registry":
        return RegistryProposer(spec["uri"], **common)
    if kind == "http":
        return HttpProposer(spec["base_url"], spec["model"], timeout=spec.get("timeout", 60.0), **common)
    raise ValueError(f"proposer spec 'kind' must be local, registry or http, got {kind!r}")


def prompt_and_reference(record: Mapping[str, Any], labels: Sequence[str] | None = None) -> tuple[Messages, str]:
    """The conversation a proposer answers and the reference answer, for one ingested record.

    Args:
        record: A record of any shape the ingest stage writes: classification
            ``{"text","label"}``, completion ``{"prompt","completion"}``, instruction
            ``{"instruction","input","output"}`` or chat ``{"messages"}`` (the last assistant
            turn is the reference, the turns before it the conversation).
        labels: For classification, the label set, named in the prompt so that a
            general-purpose proposer knows which words to answer with.

    Returns:
        ``(messages, reference)``.
    """
    if "label" in record and "text" in record:
        options = f"\nAnswer with one of: {', '.join(map(str, labels))}." if labels else ""
        return as_messages(f"{record['text']}{options}"), str(record["label"])
    if "prompt" in record and "completion" in record:
        return as_messages(record["prompt"]), record["completion"]
    if "instruction" in record:
        text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return as_messages(text), record.get("output", "")
    if "messages" in record:
        turns = list(record["messages"])
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
        if last is None:
            return as_messages(turns), ""
        return as_messages(turns[:last]), turns[last]["content"]
    raise ValueError(f"cannot make a prompt from a record with keys {sorted(record)}")


# --------------------------------------------------------------------------------------
# Calling proposers concurrently
# --------------------------------------------------------------------------------------


@dataclass
class Round:
    """The answers of one round of proposers to one conversation.

    Attributes:
        completions: Proposer name → its completion, for those that answered in time.
        dropped: Proposer name → why it was dropped ("timeout after 5s", "error: ...").
        latency_s: Wall time of the round (the slowest answer that made it, or the deadline).
    """

    completions: dict[str, Completion] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def texts(self) -> dict[str, str]:
        """Proposer name → answer text."""
        return {name: c.text for name, c in self.completions.items()}


def ask_all(
    proposers: Sequence[Proposer],
    messages: Messages,
    *,
    timeout: float = 60.0,
    max_new_tokens: int | None = None,
) -> Round:
    """Ask every proposer the same conversation at once; drop those that fail or are late.

    A ``KeyboardInterrupt`` or ``SystemExit`` inside a proposer is not a failure of that proposer:
    it stops the round and reaches the caller.

    Each call runs in its own daemon thread and the round waits at most ``timeout`` seconds
    in total. Daemon threads rather than a ``ThreadPoolExecutor``: the executor joins its
    workers at interpreter exit, so one stuck call would hang shutdown; a late daemon thread
    finishes (or dies with the process) without anyone waiting on it.

    Args:
        proposers: The proposers, with distinct names.
        messages: The conversation to answer.
        timeout: Deadline for the whole round, in seconds.
        max_new_tokens: Generation budget passed to every proposer.

    Returns:
        A :class:`Round`; ``completions`` keeps the order of ``proposers``.
    """
    names = [p.name for p in proposers]
    if len(set(names)) != len(names):
        raise ValueError(f"proposer names must be distinct, got {names}")
    outcomes: dict[str, Completion | Exception] = {}
    interrupts: list[BaseException] = []

    def call(p: Proposer) -> None:
        try:
            outcomes[p.name] = p(messages, max_new_tokens)
        except Exception as err:  # noqa: BLE001 - a failing proposer is dropped, the round goes on
            outcomes[p.name] = err
        except BaseException as err:  # Ctrl-C, SystemExit: not a proposer failure; the caller gets it
            interrupts.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=call, args=(p,), daemon=True, name=f"moa-{p.name}") for p in proposers]
    for t in threads:
        t.start()
    deadline = t0 + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
        if interrupts:  # a worker thread cannot raise into this one: re-raise it here
            raise interrupts[0]
    result = Round(latency_s=time.perf_counter() - t0)
    for name in names:
        outcome = outcomes.get(name)
        if outcome is None:
            result.dropped[name] = f"timeout after {timeout:g}s"
        elif isinstance(outcome, Exception):
            result.dropped[name] = f"error: {type(outcome).__name__}: {outcome}"
        else:
            result.completions[name] = outcome
    return result


def answer_all(
    proposer: Proposer, conversations: Sequence[Messages], *, max_new_tokens: int | None = None, batch_size: int = 8
) -> list[Completion]:
    """One proposer answers a whole dataset (the fan-out step of the ``moa`` pipeline).

    Local and registry proposers answer in batches; HTTP proposers one request at a time.
    A failed HTTP request becomes an empty answer with ``tokens == 0`` rather than failing
    the whole step, so the evaluation shows the proposer's real availability.
    """
    if hasattr(proposer, "batch"):
        return proposer.batch(conversations, max_new_tokens, batch_size)
    out = []
    for messages in conversations:
        try:
            out.append(proposer(messages, max_new_tokens))
        except Exception:  # noqa: BLE001 - counted as a wrong, free answer
            out.append(Completion(text="", tokens=0))
    return out


# --------------------------------------------------------------------------------------
# Voting
# --------------------------------------------------------------------------------------

_PREFIX = re.compile(r"^(the\s+)?(final\s+)?(answer|label|class|category)\s*(is)?\s*[:=\-]?\s*", re.I)
_EDGE = string.punctuation + string.whitespace + "“”‘’«»"


def normalize_answer(text: str | None, labels: Sequence[str] | None = None) -> str:
    """Reduce an answer to the form votes are counted on.

    First non-empty line, lower case, no "Answer:"-style prefix, no surrounding punctuation
    or quotes, single spaces. With ``labels`` (a classification task), the answer maps to
    the label it equals, else to the label named first in it, else stays as it is (and so
    agrees with no correct answer).

    Args:
        text: A model's answer.
        labels: The label set, if the task has one.

    Returns:
        The normalised answer ("" for an empty one).
    """
    if not text:
        return ""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    norm = " ".join(_PREFIX.sub("", line.strip()).strip(_EDGE).lower().split())
    if not labels:
        return norm
    canon = {" ".join(str(lab).lower().split()): str(lab).lower() for lab in labels}
    if norm in canon:
        return canon[norm]
    found = [(m.start(), lab) for key, lab in canon.items() if (m := re.search(rf"\b{re.escape(key)}\b", norm))]
    return min(found)[1] if found else norm


def label_set(references: Sequence[str], max_labels: int = 20, max_words: int = 3) -> list[str] | None:
    """The task's label set when the reference answers look like one, else ``None``.

    A classification-like task (where voting applies) has few distinct, short reference
    answers: at most ``max_labels`` of them, none longer than ``max_words`` words. Free-text
    tasks (a summary, a JSON record) get ``None`` and are voted on as normalised strings.

    Returns:
        The distinct normalised references, sorted; or ``None``.
    """
    distinct = sorted({normalize_answer(r) for r in references} - {""})
    if not distinct or len(distinct) > max_labels or any(len(d.split()) > max_words for d in distinct):
        return None
    return distinct


def _vote(answers: Mapping[str, str | None], weights: Mapping[str, float], labels) -> str | None:
    tally: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    for i, (name, text) in enumerate(answers.items()):
        norm = normalize_answer(text, labels)
        if not norm:
            continue  # an empty answer is an abstention, not a vote for ""
        tally[norm] = tally.get(norm, 0.0) + float(weights.get(name, 0.0))
        first_seen.setdefault(norm, i)
    if not tally:
        return None
    # Ties go to the answer given by the earliest proposer: deterministic, and callers list
    # proposers best first when they know the order.
    return max(tally, key=lambda a: (tally[a], -first_seen[a]))


def majority_vote(answers: Mapping[str, str | None] | Sequence[str | None], labels: Sequence[str] | None = None) -> str | None:
    """The most common normalised answer; ties go to the earliest proposer's answer.

    Args:
        answers: Proposer name → answer (or a plain list of answers). Dropped proposers are
            simply absent; empty answers abstain.
        labels: The label set, if the task has one (see :func:`normalize_answer`).

    Returns:
        The winning normalised answer, or ``None`` when nobody answered.
    """
    if not isinstance(answers, Mapping):
        answers = {str(i): a for i, a in enumerate(answers)}
    return _vote(answers, {name: 1.0 for name in answers}, labels)


def weighted_vote(
    answers: Mapping[str, str | None], weights: Mapping[str, float], labels: Sequence[str] | None = None
) -> str | None:
    """The normalised answer with the largest total weight of proposers behind it.

    Args:
        answers: Proposer name → answer; dropped proposers are absent.
        weights: Proposer name → weight, from :func:`fit_weights`. A proposer without a
            weight counts zero.
        labels: The label set, if the task has one.

    Returns:
        The winning normalised answer, or ``None`` when nobody answered.
    """
    return _vote(answers, weights, labels)


def accuracy(predictions: Sequence[str | None], references: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Share of predictions equal to the reference after :func:`normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(
        bool(normalize_answer(p, labels)) and normalize_answer(p, labels) == normalize_answer(r, labels)
        for p, r in zip(predictions, references)
    )
    return hits / len(references)


def _vote_all(predictions: Mapping[str, Sequence[str]], weights: Mapping[str, float], labels) -> list[str | None]:
    n = len(next(iter(predictions.values())))
    return [_vote({name: preds[i] for name, preds in predictions.items()}, weights, labels) for i in range(n)]


def fit_weights(
    val_predictions: Mapping[str, Sequence[str]],
    val_labels: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Fit vote weights on validation answers: the tuning at the aggregator level.

    Each proposer gets the log-odds of its validation accuracy,
    ``w = log(p / (1 - p)) + log(K - 1)`` with ``p = (correct + 1) / (n + 2)`` (Laplace, so
    a perfect proposer gets a finite weight) and ``K`` the number of classes. This is the
    optimal weighted majority rule when proposers err independently and uniformly over the
    wrong classes (Nitzan & Paroush 1982); weights below zero (worse than chance) are
    clipped to zero. Chosen over a fitted logistic regression because validation sets here
    are tens to hundreds of examples: one closed-form number per proposer cannot overfit,
    needs no regularisation strength, and reads directly as "how much this proposer is
    trusted".

    Proposers do not err independently in practice (fine-tunes of one base share
    mistakes), so the log-odds weights are then checked against two other candidates on
    the same validation data: equal weights (plain majority) and all weight on the best
    single proposer. The candidate with the highest validation accuracy wins, ties going
    to log-odds; so on the validation data the weighted vote is never below the best
    single proposer nor below majority vote.

    Args:
        val_predictions: Proposer name → its answers on the validation examples.
        val_labels: The reference answers.
        labels: The label set, if the task has one; ``K`` is its size (else the number of
            distinct references, at least 2).

    Returns:
        Proposer name → weight (non-negative).
    """
    if not val_predictions:
        raise ValueError("fit_weights needs at least one proposer's validation predictions")
    n = len(val_labels)
    k = max(2, len(labels) if labels else len({normalize_answer(r) for r in val_labels}))
    acc = {name: accuracy(preds, val_labels, labels) for name, preds in val_predictions.items()}
    log_odds = {}
    for name, a in acc.items():
        p = (a * n + 1) / (n + 2)
        log_odds[name] = max(0.0, math.log(p / (1 - p)) + math.log(k - 1))
    best = max(acc, key=acc.get)
    candidates = [
        log_odds,
        {name: 1.0 for name in val_predictions},
        {name: float(name == best) for name in val_predictions},
    ]
    scores = [accuracy(_vote_all(val_predictions, w, labels), val_labels, labels) for w in candidates]
    return candidates[scores.index(max(scores))]


# --------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------


def aggregate_messages(prompt: str | Messages, proposals: Mapping[str, str] | Sequence[str]) -> Messages:
    """The conversation an aggregator answers: the MoA system prompt with the numbered
    proposals, then the original conversation.

    Proposer names are not shown to the aggregator (the paper numbers responses only),
    and the order is the caller's, fixed per mixture, so a fine-tuned aggregator sees at
    inference exactly the layout it was trained on.
    """
    texts = list(proposals.values()) if isinstance(proposals, Mapping) else list(proposals)
    numbered = "\n".join(f"{i}. {t}" for i, t in enumerate(texts, start=1))
    return [{"role": "system", "content": f"{AGGREGATE_PROMPT}\n{numbered}"}, *as_messages(prompt)]


@dataclass
class Synthesis:
    """What :func:`synthesize` produced.

    Attributes:
        text: The aggregator's final answer.
        layers: The proposals each layer read, first layer first (layer 1 = the proposers').
        dropped: ``"layer{n}/{name}"`` → reason, for intermediate agents dropped on the way.
        tokens: Tokens generated by the intermediate agents and the final aggregator.
    """

    text: str
    layers: list[dict[str, str]]
    dropped: dict[str, str] = field(default_factory=dict)
    tokens: int = 0


def synthesize(
    aggregator: Proposer,
    prompt: str | Messages,
    proposals: Mapping[str, str],
    *,
    layers: int = 1,
    agents: Sequence[Proposer] | None = None,
    timeout: float = 60.0,
    max_new_tokens: int | None = None,
) -> Synthesis:
    """Combine proposals into one answer with an aggregator LLM, over ``layers`` layers.

    With ``layers=1`` the aggregator reads the proposals once and answers. With more, as in
    the paper, each intermediate layer's agents answer the prompt with the previous layer's
    outputs under the aggregate prompt, and their answers feed the next layer; the
    aggregator answers last. Agents that fail or miss the deadline are dropped; if a whole
    layer fails, the previous layer's proposals carry forward rather than stopping.

    Args:
        aggregator: The model that writes the final answer.
        prompt: The user's prompt or conversation.
        proposals: Proposer name → answer (layer 1).
        layers: Number of aggregation layers, at least 1.
        agents: The intermediate layers' agents; defaults to the aggregator alone (so extra
            layers are rounds of self-refinement). The paper reuses the proposers here.
        timeout: Deadline in seconds for each layer's round of calls.
        max_new_tokens: Generation budget per call.

    Returns:
        A :class:`Synthesis`.
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    current = dict(proposals)
    seen = [dict(current)]
    dropped: dict[str, str] = {}
    tokens = 0
    for layer in range(2, layers + 1):
        round_ = ask_all(
            list(agents or [aggregator]),
            aggregate_messages(prompt, current),
            timeout=timeout,
            max_new_tokens=max_new_tokens,
        )
        dropped.update({f"layer{layer}/{k}": v for k, v in round_.dropped.items()})
        tokens += sum(c.tokens for c in round_.completions.values())
        if round_.completions:
            current = round_.texts
        seen.append(dict(current))
    final = ask_all([aggregator], aggregate_messages(prompt, current), timeout=timeout, max_new_tokens=max_new_tokens)
    if aggregator.name not in final.completions:
        raise RuntimeError(f"aggregator {aggregator.name} failed: {final.dropped.get(aggregator.name)}")
    completion = final.completions[aggregator.name]
    return Synthesis(text=completion.text, layers=seen, dropped=dropped, tokens=tokens + completion.tokens)


def synthesize_batch(
    aggregator: LocalProposer | RegistryProposer,
    prompts: Sequence[str | Messages],
    proposals: Sequence[Mapping[str, str]],
    *,
    layers: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> list[Completion]:
    """:func:`synthesize` with the aggregator alone as every layer's agent, over a dataset.

    The same messages :func:`synthesize` sends, batched through the aggregator's ``batch``
    (an evaluation answers many prompts; one ``generate`` call per prompt would cost several
    times more). Tokens add up over the layers; latency is the per-answer share of them all.

    Args:
        aggregator: A local or registry model (it needs ``batch``).
        prompts: The user prompts or conversations.
        proposals: For each prompt, proposer name → answer (layer 1).
        layers: Aggregation layers, at least 1.
        max_new_tokens: Generation budget per call.
        batch_size: Conversations per ``generate`` call.

    Returns:
        One :class:`Completion` per prompt: the final answer, tokens and latency summed over layers.
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if len(prompts) != len(proposals):
        raise ValueError(f"{len(prompts)} prompts for {len(proposals)} sets of proposals")
    current = [dict(p) for p in proposals]
    tokens = [0] * len(prompts)
    latency = [0.0] * len(prompts)
    out: list[Completion] = []
    for _ in range(layers):
        convs = [aggregate_messages(prompt, cur) for prompt, cur in zip(prompts, current)]
        out = aggregator.batch(convs, max_new_tokens, batch_size)
        for i, c in enumerate(out):
            tokens[i] += c.tokens
            latency[i] += c.latency_s
        current = [{aggregator.name: c.text} for c in out]
    return [Completion(text=c.text, tokens=t, latency_s=lat) for c, t, lat in zip(out, tokens, latency)]


def build_aggregator_examples(
    prompts: Sequence[str | Messages],
    proposals: Mapping[str, Sequence[str]],
    references: Sequence[str],
) -> list[dict[str, Messages]]:
    """Chat records for fine-tuning the aggregator: (prompt + proposals → reference).

    Each record is ``{"messages": aggregate_messages(prompt, proposals) + [assistant:
    reference]}``, the chat shape the training core already takes, and the same messages
    :func:`synthesize` sends at inference.

    Args:
        prompts: The training prompts (or conversations).
        proposals: Proposer name → its answers to ``prompts``, in the mixture's order.
        references: The reference answers.

    Returns:
        One chat record per prompt.
    """
    lengths = {len(prompts), len(references), *(len(v) for v in proposals.values())}
    if len(lengths) != 1:
        raise ValueError(f"prompts, references and every proposer's answers must align, got lengths {lengths}")
    return [
        {
            "messages": aggregate_messages(prompt, {name: answers[i] for name, answers in proposals.items()})
            + [{"role": "assistant", "content": references[i]}]
        }
        for i, prompt in enumerate(prompts)
    ]


# --------------------------------------------------------------------------------------
# One question through the whole mixture
# --------------------------------------------------------------------------------------


@dataclass
class MoAAnswer:
    """A mixture's answer to one prompt.

    Attributes:
        answer: The final answer (normalised for vote modes, free text for synthesis);
            ``None`` when every proposer was dropped in a vote mode.
        proposals: Proposer name → answer, for the proposers that answered.
        dropped: Proposer (or ``layerN/agent``) name → why it was dropped.
        tokens: Tokens generated in total for this answer (proposers + aggregation).
        latency_s: Wall time for this answer.
    """

    answer: str | None
    proposals: dict[str, str]
    dropped: dict[str, str]
    tokens: int
    latency_s: float


def mixture_answer(
    proposers: Sequence[Proposer],
    prompt: str | Messages,
    *,
    mode: str = "majority",
    weights: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    aggregator: Proposer | None = None,
    layers: int = 1,
    timeout: float = 60.0,
    max_new_tokens: int | None = None,
) -> MoAAnswer:
    """Ask the proposers concurrently, then aggregate by ``mode``.

    Args:
        proposers: The mixture's proposers.
        prompt: The user's prompt or conversation.
        mode: ``majority``, ``weighted`` (needs ``weights``) or ``synthesis`` (needs
            ``aggregator``).
        weights: Proposer name → weight, from :func:`fit_weights`.
        labels: The label set for vote modes on a classification task.
        aggregator: The synthesis model.
        layers: Synthesis layers.
        timeout: Deadline in seconds for each round of calls.
        max_new_tokens: Generation budget per call.

    Returns:
        A :class:`MoAAnswer`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    round_ = ask_all(proposers, as_messages(prompt), timeout=timeout, max_new_tokens=max_new_tokens)
    tokens = sum(c.tokens for c in round_.completions.values())
    dropped = dict(round_.dropped)
    if mode == "majority":
        answer = majority_vote(round_.texts, labels)
    elif mode == "weighted":
        if weights is None:
            raise ValueError("mode 'weighted' needs weights (see fit_weights)")
        answer = weighted_vote(round_.texts, weights, labels)
    else:
        if aggregator is None:
            raise ValueError("mode 'synthesis' needs an aggregator")
        syn = synthesize(
            aggregator, prompt, round_.texts, layers=layers, timeout=timeout, max_new_tokens=max_new_tokens
        )
        answer, tokens = syn.text, tokens + syn.tokens
        dropped.update(syn.dropped)
    return MoAAnswer(
        answer=answer,
        proposals=round_.texts,
        dropped=dropped,
        tokens=tokens,
        latency_s=time.perf_counter() - t0,
    )


def comparison_table(
    predictions: Mapping[str, Sequence[str | None]],
    references: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    tokens: Mapping[str, Sequence[int]] | None = None,
    latency_s: Mapping[str, Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Rows comparing each proposer and each mixture mode on the same references.

    Args:
        predictions: Row name (a proposer, or ``moa/<mode>``) → answers.
        references: The reference answers.
        labels: The label set, if the task has one.
        tokens: Row name → tokens generated per answer (cost).
        latency_s: Row name → seconds per answer.

    Returns:
        One dict per row: ``name``, ``accuracy``, ``tokens_per_answer``, ``latency_s``.
    """
    rows = []
    for name, preds in predictions.items():
        tok = (tokens or {}).get(name)
        lat = (latency_s or {}).get(name)
        rows.append(
            {
                "name": name,
                "accuracy": accuracy(preds, references, labels),
                "tokens_per_answer": sum(tok) / len(tok) if tok else None,
                "latency_s": sum(lat) / len(lat) if lat else None,
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`comparison_table` rows (for the run's closing note)."""

    def cell(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| name | accuracy | tokens/answer | latency s |", "|---|---|---|---|"]
    lines += [
        f"| {r['name']} | {cell(r['accuracy'])} | {cell(r['tokens_per_answer'])} | {cell(r['latency_s'])} |"
        for r in rows
    ]
    return "\n".join(lines)
