"""`kubetune advise`: which method, with which settings, and why, before a GPU hour is spent.

`recommend(...)` looks at the data (examples, record shape, tokens), the need (change behaviour,
style or format, or look facts up), the base model and the hardware, and returns an `Advice`:
the recommended method (or RAG), its settings, the memory estimate of every candidate method
(`kubetune.tools.memory`), the measured GPU peak next to it where `bench/memory_validate.py` measured
the same model and method, a time estimate from measured throughput, the measured trade-offs of
a `kubetune compare` run when one is given, and the reasoning as plain lines.

The rules, in order (each printed as a reason when it applies):

1. Facts to look up (``need`` facts/fresh-facts, or a question-answering task over documents)
   -> RAG: retrieval reads the current documents at question time; fine-tuning bakes facts into
   weights, recalls them unreliably and goes stale when they change. Fine-tuning remains the
   tool for behaviour, style and format (Lewis et al., 2020; Ovadia et al., 2024, "Fine-tuning
   or retrieval?", found RAG ahead of unsupervised fine-tuning for knowledge injection).
2. Classification without a GPU, or with few examples -> feature extraction: a frozen encoder's
   embeddings and a small head train in seconds on a CPU and are a strong baseline.
3. Otherwise a generative fine-tune. Full fine-tuning when there is a lot of data (>= 20,000
   examples) and it fits; else LoRA when it fits in bf16; else QLoRA (4-bit base). Each
   method's batch size (and gradient checkpointing, when needed) is the largest that fits in 90%
   of the GPU (the rest: CUDA context, cuBLAS workspaces, allocator fragmentation, which
   ``max_memory_allocated`` does not count).
4. A `kubetune compare` result on the same data overrides 2-3 when it measured a method that
   fits as clearly better (by more than 0.02 on its metric).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.core.peft_methods import METHOD_SPECS
from kubetune.errors import ConfigError
from kubetune.tools.memory import GiB, MemoryEstimate, ModelShape, estimate, model_shape

NEEDS = ("behaviour", "style", "format", "facts", "fresh-facts")
TASKS = ("generation", "chat", "classification", "qa", "summarization", "extraction", "preference")
MEASURED_MEMORY = Path(__file__).resolve().parents[2] / "bench" / "results" / "memory_gpu.json"
USABLE_SHARE = 0.9  # of a GPU's memory, for the allocator's own tensors (see the module doc)
FULL_FT_EXAMPLES = 20_000  # below this, PEFT matches full fine-tuning closely and forgets less
CHARS_PER_TOKEN = 4.0  # English text in Llama/SmolLM BPE vocabularies: ~4 characters per token
TEMPLATE_TOKENS = 10  # chat-template tokens per message (role markers, end of turn)

# Throughput measured on one H200 (bench/results/2026-11-28-train-all-h200.json, the data behind
# docs/performance.md) as model FLOPs utilisation, so that it scales to other model sizes by
# FLOPs per token (kubetune.core.fastpath.flops_per_token). Fast path: kubetune's packed, compiled
# core; Trainer path: TRL's SFTTrainer, the same transformers Trainer kubetune's Trainer path runs.
# Keys: parameters of the measured model (SmolLM2-135M, Llama-3.2-1B shape).
MEASURED_MFU = {
    ("fast", "full"): {134_515_008: 0.1159, 1_235_814_400: 0.4100},
    ("fast", "lora"): {134_515_008: 0.0602, 1_235_814_400: 0.3187},
    ("trainer", "full"): {134_515_008: 0.0266, 1_235_814_400: 0.1027},
    ("trainer", "lora"): {134_515_008: 0.0171, 1_235_814_400: 0.0714},
}
H200_BF16_FLOPS = 989e12  # dense bf16 peak, the MFU denominator of docs/performance.md
# kubetune's own runs of SmolLM2-135M on the 2-core CPU machine: ~70 tokens/s for full and LoRA
# (train-full 72, train-peft 50-78 tokens/s): as FLOP/s, 70 x 6 x 134.5M.
CPU_FLOPS = 70 * 6 * 134_515_008
# 2 GPUs vs 1 for a 0.9B model (docs/kubernetes.md): DDP 1.5x; counted as 0.75 per GPU.
MULTI_GPU_EFFICIENCY = 0.75
# What to pass as base_model for the names kubetune.tools.memory knows (packaged or hub ids).
BASE_MODEL_REFS = {
    "smollm2-135m": "smollm2-135m-instruct", "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
}


@dataclass
class DataSummary:
    """What advice needs to know about the data."""

    examples: int
    shape: str = "unknown"
    mean_tokens: float = 256.0
    source: str = "given"
    estimated_tokens: bool = True  # mean_tokens from characters / 4, not a tokenizer

    @property
    def tokens(self) -> float:
        return self.examples * self.mean_tokens


@dataclass
class Candidate:
    method: str
    memory: MemoryEstimate
    fits: bool
    measured: dict | None = None  # a row of bench/results/memory_gpu.json for this model and method


@dataclass
class Advice:
    """What `recommend` returns.

    Attributes:
        method: The recommended method (one of kubetune.tools.memory.METHODS) or "rag".
        kind: The recommendation class: "rag", "feature-extraction", "full", "lora", "qlora", ...,
            or "none" when nothing fits the hardware.
        settings: Pipeline parameters to run it with.
        reasoning: The reasons, one per line, in the order they were applied.
        candidates: Memory estimate (and fit) of every method considered.
        time: Tokens to train, tokens/s and hours, with where the throughput comes from.
        rag: True when retrieval is the better tool for the need.
        data: The data summary the advice rests on.
    """

    method: str
    kind: str
    settings: dict
    reasoning: list[str]
    candidates: dict[str, Candidate]
    time: dict | None
    rag: bool
    data: DataSummary

    @property
    def memory(self) -> dict[str, MemoryEstimate]:
        return {m: c.memory for m, c in self.candidates.items()}

    def text(self) -> str:
        return "\n".join(self.reasoning)

    def to_dict(self) -> dict:
        return {"method": self.method, "kind": self.kind, "settings": self.settings, "rag": self.rag,
                "reasoning": self.reasoning, "time": self.time, "data": asdict(self.data),
                "candidates": {m: {"fits": c.fits, "measured": c.measured, "memory": c.memory.to_dict()}
                               for m, c in self.candidates.items()}}


# --------------------------------------------------------------------------- data


def summarize_data(data) -> DataSummary:
    """A `DataSummary` from a data URI (read with ingest's own reader and checks), a count or a dict."""
    if isinstance(data, DataSummary):
        return data
    if isinstance(data, int):
        return DataSummary(examples=data)
    if isinstance(data, dict):
        return DataSummary(**data)
    from kubetune.stages.ingest import IngestConfig, check

    result = check(IngestConfig(data_uri=str(data)))
    records = result.train + result.validation
    tokens = [_record_tokens(r) for r in records]
    return DataSummary(examples=len(records), shape=result.shape, mean_tokens=sum(tokens) / max(1, len(tokens)),
                       source=str(data), estimated_tokens=True)


def _record_tokens(record: dict) -> float:
    if "messages" in record:
        return sum(len(m["content"]) / CHARS_PER_TOKEN + TEMPLATE_TOKENS for m in record["messages"])
    text = sum(len(v) for k, v in record.items() if isinstance(v, str) and k != "label")
    return text / CHARS_PER_TOKEN + 2 * TEMPLATE_TOKENS


# --------------------------------------------------------------------------- measured numbers


def load_measured(path: str | Path | None = None) -> list[dict]:
    """Rows of bench/memory_validate.py's JSON (empty when it has not been run)."""
    path = Path(path) if path else MEASURED_MEMORY
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    device = str(data.get("device", "GPU")).replace("NVIDIA ", "")
    return [dict(r, device_name=r.get("device_name", device)) for r in data.get("rows", []) if "measured_gib" in r]


def measured_for(rows: list[dict], shape: ModelShape, method: str) -> dict | None:
    """The measured row of the same model and method (the largest measured step first)."""
    same = [r for r in rows if r.get("model") == shape.name and r.get("method") == method]
    return max(same, key=lambda r: r["batch_size"] * r["seq_len"], default=None)


def load_compare(path: str | Path) -> list[dict]:
    """Rows of a `kubetune compare` JSON: method, metric_name, base, tuned, forgetting, ..."""
    data = json.loads(Path(path).read_text())
    rows = data.get("rows", data.get("results", [])) if isinstance(data, dict) else data
    for r in rows:
        if "method" not in r or "tuned" not in r:
            raise ConfigError(f"{path}: a compare row needs 'method' and 'tuned'; got keys {sorted(r)}")
    return rows


# --------------------------------------------------------------------------- time


def _interpolated_mfu(path: str, method: str, params: int) -> float:
    """MFU measured at the two sizes, interpolated in log(parameters), held beyond them."""
    kind = "full" if method in ("full", "moe") else "lora"
    table = MEASURED_MFU[(path if path == "fast" else "trainer", kind)]
    (n0, m0), (n1, m1) = sorted(table.items())
    x = min(1.0, max(0.0, (math.log(params) - math.log(n0)) / (math.log(n1) - math.log(n0))))
    return m0 + x * (m1 - m0)


def time_estimate(shape: ModelShape, mem: MemoryEstimate, tokens: float, gpus: int, context: float) -> dict:
    """Hours to train ``tokens`` tokens with ``mem``'s method, from measured throughput."""
    from kubetune.core.fastpath import flops_per_token

    lora_like = mem.method not in ("full", "moe")
    flops = flops_per_token(shape.params, shape.vocab * shape.d_model, shape.layers, shape.d_model, context,
                            lora=lora_like)
    if mem.gradient_checkpointing:
        flops *= (8 if not lora_like else 6) / (6 if not lora_like else 4)  # the forward runs twice
    if gpus <= 0:
        tps = CPU_FLOPS / flops
        source = "kubetune's SmolLM2 runs on 2 CPU cores (~70 tokens/s), scaled by FLOPs per token"
    else:
        mfu = _interpolated_mfu(mem.path, mem.method, shape.params)
        tps = mfu * H200_BF16_FLOPS / flops * (1 if gpus == 1 else gpus * MULTI_GPU_EFFICIENCY)
        source = (f"{'fast path' if mem.path == 'fast' else 'Trainer path'} on one H200 at {100 * mfu:.1f}% MFU "
                  f"(measured, bench/results/2026-11-28-train-all-h200.json; interpolated by model size)")
        if gpus > 1:
            source += f", x{gpus} GPUs at {MULTI_GPU_EFFICIENCY:.0%} each"
        if mem.method == "qlora":
            source += "; QLoRA's 4-bit dequantisation is slower still (not measured here)"
    return {"tokens": int(tokens), "tokens_per_s": round(tps, 1), "hours": tokens / tps / 3600, "source": source}


# --------------------------------------------------------------------------- the recommendation


def _fit(shape, method, device, usable, gpus, seq_len, measured_rows, batches=(8, 4, 2, 1)) -> Candidate:
    """The largest batch that fits, with gradient checkpointing only when nothing fits without it."""
    measured = measured_for(measured_rows, shape, method)
    ckpt_ok = method not in METHOD_SPECS or METHOD_SPECS[method].gradient_checkpointing
    for ckpt in (False, True) if ckpt_ok else (False,):
        for batch in batches:
            mem = estimate(shape, method, device=device, batch_size=batch, seq_len=seq_len,
                           gradient_checkpointing=ckpt, gpus=max(1, gpus))
            if mem.total <= usable:
                return Candidate(method, mem, True, measured)
    # nothing fits: report the smallest configuration
    smallest = estimate(shape, method, device=device, batch_size=1, seq_len=seq_len,
                        gradient_checkpointing=ckpt_ok, gpus=max(1, gpus))
    return Candidate(method, smallest, False, measured)


def _memory_line(c: Candidate, usable: float | None) -> str:
    m = c.memory
    ckpt = ", gradient checkpointing" if m.gradient_checkpointing else ""
    setting = f"batch {m.batch_size} x {m.seq_len} tokens{ckpt}"
    line = f"  {c.method:<8} estimate {m.gib():6.2f} GiB  ({setting}; {m.path} path)"
    if c.measured:
        r = c.measured
        line += (f"  measured {r['measured_gib']:.2f} GiB on {r.get('device_name', 'GPU')} at batch "
                 f"{r['batch_size']} x {r['seq_len']} (estimate there {r['estimate_gib']:.2f} GiB)")
    if usable is not None:
        line += "  fits" if c.fits else "  does not fit"
    return line


def recommend(data=None, *, base_model: str = "smollm2-135m-instruct", gpu_memory_gb: float = 0.0, gpu_count: int = 0,
              task: str | None = None, need: str | None = None, seq_len: int | None = None,
              compare_json: str | Path | None = None, measured_json: str | Path | None = None) -> Advice:
    """Recommend a method and settings for fine-tuning ``base_model`` on ``data`` (or RAG).

    Args:
        data: A data URI (read and checked with ingest's machinery), a number of examples, a dict
            of `DataSummary` fields or a `DataSummary`.
        base_model: A name kubetune.tools.memory knows (``7b``, ``llama-3.1-8b``, ``smollm2-135m``, ...)
            or any model reference (its config.json is read; no weights).
        gpu_memory_gb: Memory of one GPU in GB (0 with ``gpu_count=0``: CPU only).
        gpu_count: GPUs in one pod (0 = CPU).
        task: generation, chat, classification, qa, summarization, extraction or preference;
            default: classification/preference for data of those shapes, generation otherwise.
        need: behaviour, style, format (what fine-tuning changes) or facts, fresh-facts (what
            retrieval serves); default: facts for qa, behaviour otherwise.
        seq_len: Tokens per row; default from the data's example lengths.
        compare_json: A `kubetune compare` result on this data, whose measured trade-offs are cited
            and can decide between methods.
        measured_json: bench/memory_validate.py's JSON (default: bench/results/memory_gpu.json).

    Returns:
        An `Advice`; ``advice.text()`` is the reasoning to print.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"'task' must be one of {', '.join(TASKS)}; got {task!r}")
    if need is not None and need not in NEEDS:
        raise ConfigError(f"'need' must be one of {', '.join(NEEDS)}; got {need!r}")
    if gpu_count < 0 or gpu_memory_gb < 0:
        raise ConfigError("'gpu_count' and 'gpu_memory_gb' must be >= 0")
    if data is None:
        raise ConfigError("'data' is required: a data URI or a number of examples")
    summary = summarize_data(data)
    task = task or (summary.shape if summary.shape in ("classification", "preference") else "generation")
    need = need or ("facts" if task == "qa" else "behaviour")
    shape = model_shape(base_model)
    device = "cuda" if gpu_count > 0 and gpu_memory_gb > 0 else "cpu"
    gpus = gpu_count if device == "cuda" else 0
    usable = USABLE_SHARE * gpu_memory_gb * GiB if device == "cuda" else None
    seq_len = seq_len or _row_length(summary.mean_tokens)
    measured_rows = load_measured(measured_json)
    compare = load_compare(compare_json) if compare_json else []

    why: list[str] = []
    hw = f"{gpus} GPU{'s' if gpus > 1 else ''} of {gpu_memory_gb:g} GB" if device == "cuda" else "CPU only"
    why.append(f"Data: {summary.examples:,} examples ({summary.shape}), ~{summary.mean_tokens:.0f} tokens each"
               f"{' (characters / 4)' if summary.estimated_tokens and summary.source != 'given' else ''}, "
               f"~{summary.tokens:,.0f} tokens; source {summary.source}.")
    why.append(f"Model: {shape.name}, {shape.params / 1e9:.2f}B parameters; hardware: {hw}; task {task}, need {need}.")

    # ---- 1. retrieval
    rag = need in ("facts", "fresh-facts") or (task == "qa" and summary.shape == "text")
    # ---- candidates and their memory
    if task == "classification" and (device == "cpu" or summary.examples < 2_000) and not rag:
        methods = ["feature-extraction", "lora"] if device == "cuda" else ["feature-extraction", "lora", "full"]
    else:
        methods = [m for m in ("full", "lora", "qlora", "dora", "adapter", "ia3", "prompt")
                   if device == "cuda" or not METHOD_SPECS[m].needs_cuda]
    candidates: dict[str, Candidate] = {}
    for m in methods:
        if m == "feature-extraction":
            backbone = model_shape("minilm-l6-v2")
            mem = estimate(backbone, m, device=device, batch_size=32, seq_len=128)
            candidates[m] = Candidate(m, mem, usable is None or mem.total <= usable)
            continue
        candidates[m] = _fit(shape, m, device, usable if usable is not None else float("inf"), gpus, seq_len,
                             measured_rows)
    fits = [m for m, c in candidates.items() if c.fits]

    if rag:
        kind = method = "rag"
        why.append("Choice: retrieval-augmented generation (RAG), not fine-tuning.")
        if need == "fresh-facts":
            why.append("- The facts change: a fine-tuned model knows them as of its training run and must be "
                       "retrained at every change; retrieval reads the current documents at question time.")
        else:
            why.append("- The need is looking facts up: fine-tuning bakes facts into weights, where the model "
                       "recalls them unreliably and cannot cite them; retrieval puts the source passage in the "
                       "prompt (and the answer can quote it).")
        if summary.shape == "text":
            why.append("- The data are documents (text records): index them as they are, no labelled pairs needed.")
        fallback = "lora" if "lora" in fits else ("qlora" if "qlora" in fits else None)
        if fallback:
            why.append(f"- Fine-tune in addition only if the answers' style or format must change: {fallback} on "
                       f"(question, retrieved passages, answer) examples, estimate "
                       f"{candidates[fallback].memory.gib():.2f} GiB.")
        settings = {"retriever": "dense embeddings of ~300-token chunks (minilm-l6-v2, the encoder kubetune ships)",
                    "generator": BASE_MODEL_REFS.get(shape.name, base_model), "top_k_passages": 4}
    else:
        method, kind, reasons = _choose(task, need, summary, candidates, fits, device, compare)
        why.extend(reasons)
        data_uri = summary.source if summary.source != "given" else None
        settings = _settings(method, candidates.get(method), summary, seq_len, base_model, data_uri) \
            if method != "none" else {}

    # ---- memory table
    why.append(f"Memory per method (kubetune.tools.memory; {'90% of one GPU usable' if usable else 'CPU RAM'}"
               f"{f': {usable / GiB:.1f} GiB' if usable else ''}):")
    for c in candidates.values():
        why.append(_memory_line(c, usable))
    if method in candidates:
        c = candidates[method]
        line = f"Memory of the choice: estimate {c.memory.gib():.2f} GiB"
        if c.measured:
            r = c.measured
            same = (r["batch_size"], r["seq_len"]) == (c.memory.batch_size, c.memory.seq_len)
            where = "" if same else (f" at batch {r['batch_size']} x {r['seq_len']}, where the estimate was "
                                     f"{r['estimate_gib']:.2f} GiB")
            line += f" (measured {r['measured_gib']:.2f} GiB on {r.get('device_name', 'GPU')}{where})"
        elif device == "cuda":
            line += " (no GPU measurement of this model and method yet: bench/memory_validate.py)"
        why.append(line + f": {c.memory.breakdown()}.")
        for note in c.memory.notes:
            why.append(f"  note: {note}")

    # ---- time
    timing = None
    if method in candidates:
        epochs = settings.get("epochs", 1)
        mem = candidates[method].memory
        if method == "feature-extraction":
            tokens = summary.tokens
            flops_tok = 2 * model_shape("minilm-l6-v2").params
            tps = (CPU_FLOPS if device == "cpu" else 0.3 * H200_BF16_FLOPS) / flops_tok
            timing = {"tokens": int(tokens), "tokens_per_s": round(tps, 1), "hours": tokens / tps / 3600,
                      "source": "one forward pass of the frozen encoder per example (2 x parameters FLOPs per token)"}
        else:
            timing = time_estimate(shape, mem, summary.tokens * epochs, gpus,
                                   context=min(seq_len, summary.mean_tokens))
        why.append(f"Time: {timing['tokens']:,} tokens ({epochs} epoch{'s' if epochs != 1 else ''}) at "
                   f"~{timing['tokens_per_s']:,.0f} tokens/s = {_duration(timing['hours'])} of training; "
                   f"throughput from {timing['source']}.")
    if settings.get("command"):
        why.append(f"Run: {settings['command']}")
    elif settings:
        why.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return Advice(method=method, kind=kind, settings=settings, reasoning=why, candidates=candidates, time=timing,
                  rag=rag, data=summary)


def _choose(task, need, summary, candidates, fits, device, compare) -> tuple[str, str, list[str]]:
    reasons: list[str] = []
    n = summary.examples
    if "feature-extraction" in candidates:
        method = "feature-extraction"
        reasons.append("Choice: feature extraction (embeddings of the frozen minilm-l6-v2 encoder + a small "
                       "classification head).")
        if device == "cpu":
            reasons.append("- No GPU: the encoder only runs forward, once per example, and the head trains on the "
                           "cached embeddings in seconds; fine-tuning an LLM on 2 CPU cores takes hours.")
        else:
            reasons.append(f"- {n:,} examples: a head on frozen embeddings is the strong, cheap baseline; fine-tune "
                           "(lora) only if it falls short on the validation split.")
    elif n >= FULL_FT_EXAMPLES and "full" in fits and need in ("behaviour", "style") and task != "classification":
        method = "full"
        reasons.append("Choice: full fine-tuning.")
        reasons.append(f"- {n:,} examples are enough to use every weight's capacity for a deep change of "
                       f"{need}; watch evaluate's forgetting score against the base model.")
    elif "lora" in fits:
        method = "lora"
        reasons.append("Choice: LoRA (rank 16 on every linear layer).")
        if n < FULL_FT_EXAMPLES:
            reasons.append(f"- {n:,} examples: LoRA comes close to full fine-tuning at this size, trains "
                           f"{candidates['lora'].memory.trainable_params / candidates['lora'].memory.total_params:.1%} "
                           "of the weights and forgets less of what the base model knew.")
        if "full" in candidates and "full" not in fits:
            reasons.append(f"- Full fine-tuning does not fit: estimate {candidates['full'].memory.gib():.1f} GiB.")
        if n < 100:
            reasons.append("- Under 100 examples: try few-shot prompting first; LoRA with few steps otherwise.")
    elif "qlora" in fits:
        method = "qlora"
        reasons.append("Choice: QLoRA (LoRA over a 4-bit NF4 base model).")
        lora = candidates["lora"].memory
        reasons.append(f"- LoRA does not fit: its bf16 weights alone are {lora.gib('weights'):.1f} "
                       f"GiB, estimate {lora.gib():.1f} GiB in all; the 4-bit base is "
                       f"{candidates['qlora'].memory.gib('weights'):.1f} GiB.")
    elif fits:
        method = min(fits, key=lambda m: candidates[m].memory.total)
        reasons.append(f"Choice: {method}, the only kind of method that fits.")
    else:
        reasons.append("Choice: none fits this hardware: use a smaller base model, more GPUs (full fine-tuning "
                       "shards over them) or a GPU with more memory.")
        return "none", "none", reasons
    chosen = method
    if compare:
        reasons.append("Measured by `kubetune compare` on this data:")
        for r in compare:
            delta = r["tuned"] - r.get("base", r["tuned"])
            extra = []
            if r.get("forgetting") is not None:
                extra.append(f"forgetting {r['forgetting']:+.3f}")
            if r.get("trainable_params"):
                extra.append(f"{r['trainable_params']:,} trainable")
            if r.get("peak_mem_bytes"):
                extra.append(f"peak {r['peak_mem_bytes'] / GiB:.2f} GiB")
            if r.get("wall_s"):
                extra.append(f"{r['wall_s']:.0f} s")
            if r.get("tokens_per_s"):
                extra.append(f"{r['tokens_per_s']:.0f} tokens/s")
            reasons.append(f"  {r['method']:<18} {r.get('metric_name', 'metric')} {r.get('base', float('nan')):.3f} -> "
                           f"{r['tuned']:.3f} ({delta:+.3f}); " + ", ".join(extra))
        better = _better_measured(compare, chosen, set(fits))
        if better:
            method = better
            reasons.append(f"- {better} measured clearly better than {chosen} on this data and fits: {better} it is.")
        elif any(r["method"] == chosen for r in compare):
            reasons.append(f"- The measurement agrees: no method that fits beat {chosen} by more than 0.02.")
    return method, method, reasons


def _better_measured(compare: list[dict], chosen: str, fits: set[str], margin: float = 0.02) -> str | None:
    rows = {r["method"]: r for r in compare if r["method"] in fits}
    if chosen not in rows or not rows:
        return None
    from kubetune.lib.report import lower_is_better

    sign = -1 if lower_is_better(rows[chosen].get("metric_name", "")) else 1
    best = max(rows.values(), key=lambda r: sign * r["tuned"])
    if best["method"] != chosen and sign * (best["tuned"] - rows[chosen]["tuned"]) > margin:
        return best["method"]
    return None


def _settings(method: str, cand: Candidate | None, summary: DataSummary, seq_len: int, base_model: str,
              data_uri: str | None) -> dict:
    """Pipeline parameters to run ``method`` with, and the command line that runs them."""
    from kubetune.core.peft_methods import METHODS as TRAIN_METHODS
    from kubetune.core.peft_methods import default_learning_rate

    params: dict = {}
    if data_uri:
        params["data_uri"] = data_uri
    if method == "feature-extraction":
        pipeline = "feature-extraction"
        params.update(base_model="minilm-l6-v2", head="linear")
        epochs = 1
    else:
        mem = cand.memory
        pipeline = {"full": "full", "moe": "moe"}.get(method, "dpo" if summary.shape == "preference" else "peft")
        epochs = 3 if summary.examples < 1_000 else (2 if summary.examples < 10_000 else 1)
        accum = max(1, 16 // mem.batch_size)  # an effective batch of ~16 rows
        rows = summary.tokens / seq_len  # packed rows of seq_len tokens
        params["base_model"] = BASE_MODEL_REFS.get(model_shape(base_model).name, base_model)
        if pipeline == "peft":
            params["method"] = method
        params.update(max_steps=max(10, math.ceil(epochs * rows / (mem.batch_size * accum))))
        if method in TRAIN_METHODS:
            params["learning_rate"] = default_learning_rate(method)
        if method in TRAIN_METHODS and METHOD_SPECS[method].family in ("lora", "adapter") and pipeline == "peft":
            params["lora_rank"] = 16
        if pipeline != "dpo":
            params["max_length"] = seq_len
        train = {"batch_size": mem.batch_size, "gradient_accumulation_steps": accum}
        if mem.gradient_checkpointing:
            train["gradient_checkpointing"] = True
        params["train_settings"] = train
    command = f"kubetune run {pipeline} " + " ".join(
        f"--set '{k}={_yaml(v)}'" if isinstance(v, dict) else f"--set {k}={v}" for k, v in params.items())
    return {"pipeline": pipeline, **params, "epochs": epochs, "command": command}


def _yaml(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()) + "}"


def _row_length(mean_tokens: float) -> int:
    """Rows long enough for most examples: a power of two >= 2 x the mean, 256 to 4096."""
    return int(min(4096, max(256, 2 ** math.ceil(math.log2(max(1.0, 2 * mean_tokens))))))


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


# --------------------------------------------------------------------------- CLI


def add_advise_parser(sub) -> None:
    """Add the `advise` subcommand to kubetune's CLI (``sub``: its subparsers)."""
    a = sub.add_parser("advise", help="recommend a method and settings (or RAG) for data, model and hardware")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data URI (path, file://, s3://, bundled://): read and checked like ingest")
    src.add_argument("--examples", type=int, help="number of examples, when the data is not at hand")
    a.add_argument("--shape", default="unknown", help="record shape with --examples (chat, instruction, text, ...)")
    a.add_argument("--tokens-per-example", type=float, default=256.0, help="mean tokens per example with --examples")
    a.add_argument("--task", choices=TASKS, help="default: the data's shape decides (classification, preference), "
                                                 "else generation")
    a.add_argument("--need", choices=NEEDS, help="what must change (behaviour/style/format) or be looked up "
                                                 "(facts/fresh-facts); default: facts for qa, else behaviour")
    a.add_argument("--base-model", default="smollm2-135m-instruct",
                   help="known name (smollm2-135m, 1b, 3b, 7b, 8b, 13b, 70b, ...) or a model reference")
    a.add_argument("--gpu-memory", type=float, default=0.0, help="GB of memory of one GPU (0 = CPU only)")
    a.add_argument("--gpus", type=int, default=None, help="GPUs in one pod (default: 1 with --gpu-memory, else 0)")
    a.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: from the data)")
    a.add_argument("--compare", help="JSON written by `kubetune compare` on this data")
    a.add_argument("--measured", help="bench/memory_validate.py JSON (default: bench/results/memory_gpu.json)")
    a.add_argument("--json", action="store_true", help="print the advice as JSON")
    a.set_defaults(func=cmd_advise)


def cmd_advise(args) -> int:
    gpus = args.gpus if args.gpus is not None else (1 if args.gpu_memory > 0 else 0)
    data = args.data if args.data else DataSummary(examples=args.examples, shape=args.shape,
                                                   mean_tokens=args.tokens_per_example, estimated_tokens=False)
    advice = recommend(data, base_model=args.base_model, gpu_memory_gb=args.gpu_memory, gpu_count=gpus,
                       task=args.task, need=args.need, seq_len=args.seq_len, compare_json=args.compare,
                       measured_json=args.measured)
    if args.json:
        json.dump(advice.to_dict(), sys.stdout, indent=2, default=str)
        print()
    else:
        print(f"kubetune advise: {advice.method}" + (" (retrieval, not fine-tuning)" if advice.rag else ""))
        print(advice.text())
    return 0
