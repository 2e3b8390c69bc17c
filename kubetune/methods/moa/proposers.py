"""Proposers: the models of a mixture, each answering a chat conversation with a :class:`Completion`.

:class:`LocalProposer` runs a transformers folder (or a GGUF file) in-process,
:class:`RegistryProposer` downloads a model registered in MLflow and runs it the same way,
:class:`HttpProposer` calls an OpenAI-compatible ``/v1/chat/completions`` endpoint, which is how
models served by vLLM or KServe are reached in practice. :func:`ask_all` calls several at once
with one deadline; :func:`answer_all` has one proposer answer a whole dataset.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


Messages = list[dict[str, str]]


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
