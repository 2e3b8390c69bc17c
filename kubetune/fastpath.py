"""GPU fast path of the one training core: packed rows, per-example attention, fused loss.

`train_full` and `train_peft` reach this through the training core in `kubetune/train.py`
when a CUDA device is there; on the CPU the same functions run with plain PyTorch fallbacks,
which is what the tests check. What makes it fast (measured in docs/performance.md):

1. **Packing into one fixed-length row per micro-step.** Examples are bin-packed
   (best-fit decreasing) into rows of exactly `tokens_per_step` tokens, so every step has the
   same shape: no padding waste to speak of, and `torch.compile` never sees a new shape.
2. **Per-example causal attention without a mask.** The row goes through the model with
   `position_ids` that restart at each example and the example boundaries as `cu_seqlens`;
   attention is PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen`),
   registered with transformers as the attention implementation `kubetune_varlen`. Nothing
   of size T×T is ever built, and attention costs Σ len² rather than T².
3. **Chunked linear cross-entropy.** The logits (T × vocab, 4 GiB in fp32 for 16k tokens of
   Llama-3's 128k vocabulary) are never materialised: the loss and both gradients are
   computed chunk by chunk in the forward pass (the idea of Liger's fused linear CE, in plain
   PyTorch so that no extra dependency is needed).
4. **Compiled decoder blocks, fused AdamW, no host stalls.** Each decoder layer is compiled
   (fuses RMSNorm, RoPE, SwiGLU and lets the partitioner recompute cheap pointwise results
   instead of saving them); the optimizer is `AdamW(fused=True)`; batches are built on the
   host ahead of time and copied from pinned memory; the loss is read back one step late.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "kubetune_varlen"
"""Name under which the packed attention is registered with transformers."""

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- data


def split_examples(rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut tokenized rows back into examples.

    A row may hold several packed examples; an example starts wherever `position_ids` is 0.

    Args:
        rows: dicts with `input_ids`, `labels` and optionally `position_ids`.

    Returns:
        One `(input_ids, labels)` pair of int64 arrays per example.
    """
    out = []
    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        labels = np.asarray(row.get("labels", row["input_ids"]), dtype=np.int64)
        pos = row.get("position_ids")
        if pos is None:
            starts = [0]
        else:
            starts = np.flatnonzero(np.asarray(pos) == 0).tolist() or [0]
            if starts[0] != 0:
                starts = [0] + starts
        ends = starts[1:] + [len(ids)]
        out.extend((ids[s:e], labels[s:e]) for s, e in zip(starts, ends) if e > s)
    return out


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example lengths into rows of `capacity` tokens.

    Longest first, each into the fullest row it still fits (TRL's "bfd" strategy); with
    lognormal SFT lengths this leaves well under 1% of a row empty.

    Args:
        lengths: token count of each example (each at most `capacity`).
        capacity: tokens per row.

    Returns:
        Lists of example indices, one list per row.
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (free tokens, bin id), sorted ascending
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


@dataclass
class PackedRow:
    """One row of `capacity` tokens holding whole examples, ready for the device."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64, restarts at 0 per example
    targets: torch.Tensor  # (T,) int64, label of the NEXT token, -100 at example ends
    cu_seqlens: torch.Tensor  # (docs + 1,) int32, example boundaries
    max_seqlen: int  # longest example (or padding piece) in the row
    n_tokens: int  # real (non-padding) tokens
    n_targets: int  # positions that count in the loss


def build_row(examples, idxs, capacity: int, pad_token_id: int = 0) -> PackedRow:
    """Lay examples end to end in one row and pad it to exactly `capacity` tokens.

    Targets are shifted inside each example, so the last token of one example never
    predicts the first of the next. The padding is cut into pieces no longer than the
    longest example so that it does not raise `max_seqlen` (the attention kernel's grid).
    """
    ids = np.full(capacity, pad_token_id, dtype=np.int64)
    pos = np.zeros(capacity, dtype=np.int64)
    tgt = np.full(capacity, IGNORE_INDEX, dtype=np.int64)
    cu = [0]
    at = 0
    for i in idxs:
        x, y = examples[i]
        n = min(len(x), capacity - at)
        ids[at : at + n] = x[:n]
        pos[at : at + n] = np.arange(n)
        tgt[at : at + n - 1] = y[1:n]
        at += n
        cu.append(at)
    n_tokens = at
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=1)
    piece = max(longest, 1)
    while at < capacity:  # padding: its own "examples", attended to by nobody real
        n = min(piece, capacity - at)
        pos[at : at + n] = np.arange(n)
        at += n
        cu.append(at)
    return PackedRow(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        targets=torch.from_numpy(tgt),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=int(max(b - a for a, b in zip(cu, cu[1:]))),
        n_tokens=n_tokens,
        n_targets=int((tgt != IGNORE_INDEX).sum()),
    )


def packed_rows(examples, capacity: int, seed: int, pad_token_id: int = 0):
    """Endless stream of packed rows: each epoch re-packs and shuffles the row order."""
    lengths = [min(len(x), capacity) for x, _ in examples]
    rng = np.random.default_rng(seed)
    bins = pack_bins(lengths, capacity)
    while True:
        for b in rng.permutation(len(bins)):
            yield build_row(examples, bins[b], capacity, pad_token_id)


# --------------------------------------------------------------------------- attention


def _varlen_fn():
    """PyTorch's varlen FlashAttention and how to ask it for causal/GQA, or None if absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "is_causal" in params, "enable_gqa" in params


_VARLEN = _varlen_fn()


@torch.compiler.disable  # a graph break here keeps max_seqlen (a Python int) out of compiled graphs
def _varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    fn, has_is_causal, has_gqa = _VARLEN
    kwargs = {"scale": scale}
    if has_is_causal:  # torch 2.10's spelling
        kwargs["is_causal"] = True
    else:  # later versions: causal is a (left, right) = (-1, 0) window
        kwargs["window_size"] = (-1, 0)
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _per_example_attention(q, k, v, cu_seqlens, scale: float):
    """Reference path (CPU, or no varlen kernel): causal SDPA on each example separately."""
    cu = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        for s, e in zip(cu[:-1], cu[1:])
        if e > s
    ]
    return torch.cat(outs, dim=2)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function over one packed row, never across examples.

    Called by the model's attention layers with query (1, H, T, D) and key/value
    (1, H_kv, T, D); the example boundaries arrive as the keyword `kt_cu_seqlens`
    (and `kt_max_seqlen`), passed through the model's forward.

    Returns:
        (output of shape (1, T, H, D), None), as transformers expects.
    """
    cu = kwargs.get("kt_cu_seqlens")
    if cu is None:
        raise ValueError(f"attention '{ATTN_IMPLEMENTATION}' needs kt_cu_seqlens (use kubetune.fastpath)")
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per forward (batch size 1)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.is_cuda and _VARLEN is not None and query.dtype in (torch.bfloat16, torch.float16):
        # (1, H, T, D) -> (T, H, D), the varlen layout
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = _varlen_attention(q, k, v, cu, int(kwargs["kt_max_seqlen"]), scale)
        return out.unsqueeze(0), None
    out = _per_example_attention(query, key, value, cu, scale)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register `packed_attention` with transformers (idempotent).

    It is not registered as a mask function on purpose: transformers then builds no
    attention mask at all for it, which is the point.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention)


# --------------------------------------------------------------------------- loss


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """Summed CE of one chunk (times `scale`) and its gradient w.r.t. the logits.

    d/dz of -log softmax(z)[t] is softmax(z) - onehot(t). One read of the logits in fp32,
    one write of the gradient in the logits' dtype (the compiler fuses the rest).
    """
    x = logits.float()
    valid = targets != IGNORE_INDEX
    t = targets.clamp_min(0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, t[:, None]).squeeze(1)
    w = valid.float() * scale
    loss = ((lse - picked) * w).sum()
    p = torch.exp(x - lse[:, None])
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == t[:, None]
    grad = (p - onehot.float()) * w[:, None]
    return loss, grad.to(logits.dtype)


_ce_chunk_compiled = None


def _ce_kernel(is_cuda: bool):
    global _ce_chunk_compiled
    if not is_cuda:
        return _ce_chunk
    if _ce_chunk_compiled is None:
        _ce_chunk_compiled = torch.compile(_ce_chunk, dynamic=False)
    return _ce_chunk_compiled


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = Σ CE(hidden @ weightᵀ, targets) · scale, without keeping the logits.

    The gradients w.r.t. hidden and weight are computed chunk by chunk in the forward pass
    (the logits of one chunk live only inside the loop) and handed back in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk: int, compute_dtype, use_compiled: bool):
        kernel = _ce_kernel(use_compiled)
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        need_w = weight.requires_grad
        grad_h = torch.empty_like(h) if hidden.requires_grad else None
        grad_w = torch.zeros_like(w) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            lc, g = kernel(hc @ w.t(), targets[s : s + chunk], scale)
            loss += lc
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[s : s + chunk])
            if need_w:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_out).to(ctx.dtypes[0])
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    chunk: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Σ over valid targets of CE(hidden @ weightᵀ) times `scale`, with logits never stored.

    Args:
        hidden: (N, d) final hidden states.
        weight: (V, d) output embedding (the lm_head weight, tied or not).
        targets: (N,) next-token labels, -100 where nothing is predicted.
        scale: multiplies the summed loss: 1 / (target tokens in the optimizer step) gives
            the mean that transformers' loss computes, also across gradient accumulation.
        chunk: rows per chunk; default keeps one chunk's logits under 2**28 elements
            (1024 rows of a 128k vocabulary: 0.25 GiB in bf16; 4096 rows of 49k).
        compute_dtype: matmul dtype (default: the weight's).

    Returns:
        A scalar fp32 loss with a gradient for `hidden` and `weight`.
    """
    V = weight.shape[0]
    # a power of two, so that it divides the (power-of-two) row length: one compiled shape
    chunk = chunk or 2 ** max(8, min(13, (2**28 // V).bit_length() - 1))
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=hidden.device)
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, scale.float(), chunk, compute_dtype or weight.dtype, hidden.is_cuda
    )


# --------------------------------------------------------------------------- training


def supports_fast_path(model) -> bool:
    """True for decoder-only LMs whose logits are a plain linear map of the last hidden state.

    Models that scale or soft-cap their logits (Gemma 2, Cohere) or whose lm_head has a
    bias or is itself adapted by PEFT go through the reference path instead.
    """
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    cfg = model.config
    return (
        decoder is not None
        and type(head) is torch.nn.Linear
        and head.bias is None
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
        and not getattr(cfg, "is_encoder_decoder", False)
    )


def _lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to 0 (transformers' default `linear` schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def fast_train(
    model,
    rows: list[dict],
    *,
    max_steps: int,
    lr: float,
    tokens_per_step: int = 12288,
    grad_accum: int = 1,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    compile: bool | None = None,
    pad_token_id: int = 0,
    timing_warmup: int | None = None,
    on_step: Callable[[int, float, float, int], None] | None = None,
    max_seconds: float = 0.0,
) -> dict:
    """Train `model` in place on packed rows; the fast core under `train_full`/`train_peft`.

    Every optimizer step sees `grad_accum` rows of exactly `tokens_per_step` tokens, each
    holding whole examples (longer ones are cut to `tokens_per_step`). The loss is the mean
    next-token CE over the labelled tokens of the step, as transformers computes it for the
    same examples in a padded batch.

    Args:
        model: a transformers causal LM, plain or PEFT-wrapped, on the device to train on;
            the trainable parameters are those with `requires_grad`. bf16 weights train in
            bf16; fp32 weights train under bf16 autocast on CUDA (fp32 master weights).
        rows: tokenized rows with `input_ids`, `labels` (-100 = no loss) and `position_ids`
            (restarting at 0 at each example, as `tokenize_data` writes them).
        max_steps: optimizer steps.
        lr: peak learning rate.
        tokens_per_step: tokens in one packed row (one forward/backward). 12288 keeps a
            1.2B full fine-tune at 24 GiB on an H200 (docs/performance.md); a multiple of
            the loss chunk (1024 rows for a 128k vocabulary, 4096 for 49k) keeps one shape.
        grad_accum: rows per optimizer step.
        warmup_steps: linear warm-up steps (then linear decay to 0).
        weight_decay: AdamW decoupled weight decay on matrices (not on norms or biases).
        grad_clip: clip the global gradient norm to this (None: no clipping).
        seed: seeds the row order.
        compile: compile each decoder layer; default: on CUDA only.
        pad_token_id: token that fills the end of a row (never attended to by real tokens,
            never in the loss).
        timing_warmup: steps left out of the throughput figure (compilation, allocator
            warm-up); default min(5, max_steps // 4).
        max_seconds: stop after the step that crosses this wall-clock budget (0 = none); the
            learning-rate schedule stays laid out over max_steps.
        on_step: called as on_step(step, loss, lr, tokens) after each step (one step late on
            the device, so that reading the loss never stalls the queue).

    Returns:
        Metrics: `tokens_per_s` (real tokens, padding excluded), `step_s`, `peak_mem_gib`,
        `final_loss`, `losses`, `tokens`, `steps`, `compile_s` (first step's time).
    """
    from transformers import AttentionInterface  # noqa: F401  (fails early if transformers is absent)

    if not supports_fast_path(model):
        raise ValueError("this model needs the reference training path (see supports_fast_path)")
    register_attention()
    device = next(model.parameters()).device
    is_cuda = device.type == "cuda"
    compile = is_cuda if compile is None else compile
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    master_fp32 = params[0].dtype == torch.float32
    autocast = is_cuda and master_fp32
    compute_dtype = torch.bfloat16 if is_cuda else head.weight.dtype

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=is_cuda,
    )
    examples = split_examples(rows)
    if not examples:
        raise ValueError("no examples in rows")
    stream = packed_rows(examples, tokens_per_step, seed, pad_token_id)
    timing_warmup = min(5, max_steps // 4) if timing_warmup is None else timing_warmup

    old_attn = model.config._attn_implementation
    old_training = model.training
    layers = list(getattr(decoder, "layers", []))
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.train()
    if compile:
        for layer in layers:
            layer.compile()

    def to_dev(*tensors):
        # pinned + non_blocking: the copy queues behind the running step instead of waiting for it
        return [x.pin_memory().to(device, non_blocking=True) if is_cuda else x for x in tensors]

    losses: list[float] = []
    pending = None  # (step, loss tensor, lr, tokens) reported once the next step is queued
    tokens_timed, t_start, compile_s = 0, None, 0.0
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_first = time.perf_counter()
    steps_done = max_steps
    try:
        for step in range(max_steps):
            if max_seconds and step > timing_warmup and time.perf_counter() - t_first > max_seconds:
                steps_done = step
                break
            if step == timing_warmup:
                if is_cuda:
                    torch.cuda.synchronize(device)
                t_start = time.perf_counter()
            micro = [next(stream) for _ in range(grad_accum)]
            n_targets = sum(r.n_targets for r in micro)
            # built on the host and copied like the batch: torch.tensor(x, device="cuda") would
            # wait for the queue to drain
            (scale,) = to_dev(torch.tensor(1.0 / max(1, n_targets)))
            step_loss = torch.zeros((), device=device)
            for row in micro:
                ids, pos, tgt, cu = to_dev(row.input_ids, row.position_ids, row.targets, row.cu_seqlens)
                if compile:  # the number of examples varies per row: no recompilation for it
                    torch._dynamo.mark_dynamic(cu, 0)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    hidden = decoder(
                        input_ids=ids[None], position_ids=pos[None], use_cache=False,
                        kt_cu_seqlens=cu,
                        # a CPU tensor, not an int: compiled layers would specialise on an int
                        kt_max_seqlen=torch.tensor(row.max_seqlen),
                    ).last_hidden_state[0]
                loss = linear_cross_entropy(hidden, head.weight, tgt, scale, compute_dtype=compute_dtype)
                loss.backward()
                step_loss += loss.detach()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=is_cuda)
            cur_lr = _lr_at(step, lr, warmup_steps, max_steps)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            if pending is not None:  # the previous step's loss is ready by now
                losses.append(_report(pending, on_step))
            pending = (step, step_loss, cur_lr, sum(r.n_tokens for r in micro))
            if step >= timing_warmup:
                tokens_timed += pending[3]
            if step == 0:
                if is_cuda:
                    torch.cuda.synchronize(device)
                compile_s = time.perf_counter() - t_first
        losses.append(_report(pending, on_step))
        if is_cuda:
            torch.cuda.synchronize(device)
        t_end = time.perf_counter()
    finally:
        model.config._attn_implementation = old_attn
        model.train(old_training)
        for layer in layers:
            layer._compiled_call_impl = None  # undo layer.compile()
    timed_steps = steps_done - timing_warmup
    elapsed = (t_end - t_start) if t_start is not None else float("nan")
    return {
        "steps": steps_done,
        "tokens": int(tokens_timed),
        "tokens_per_s": tokens_timed / elapsed if timed_steps > 0 else float("nan"),
        "step_s": elapsed / timed_steps if timed_steps > 0 else float("nan"),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda else float("nan"),
        "final_loss": losses[-1],
        "losses": losses,
        "compile_s": compile_s,
        "tokens_per_step": tokens_per_step * grad_accum,
    }


def _report(pending, on_step) -> float:
    step, loss_t, lr, tokens = pending
    loss = float(loss_t)
    if on_step is not None:
        on_step(step, loss, lr, tokens)
    return loss


def mean_context(examples_or_lengths) -> float:
    """Token-weighted mean example length Σn²/Σn: the S of per-example attention FLOPs."""
    n = np.asarray([len(e[0]) if isinstance(e, tuple) else e for e in examples_or_lengths], dtype=np.float64)
    return float((n * n).sum() / n.sum())


def flops_per_token(n_params: int, n_embedding: int, n_layers: int, d_model: int, context: float,
                    lora: bool = False) -> float:
    """Model FLOPs per trained token, torchtitan's convention.

    Full fine-tuning: 6·(N − embedding params) + 12·L·d·S (forward 2·, backward 4· per
    weight; 12·L·d·S for QKᵀ and AV forward and backward over a context of S tokens).
    LoRA: the frozen weights need no weight gradients, so 4·(N − embedding) + 12·L·d·S
    (the adapters' own FLOPs, under 1% at r=16, are left out).
    """
    return (4 if lora else 6) * (n_params - n_embedding) + 12 * n_layers * d_model * context


__all__ = [
    "ATTN_IMPLEMENTATION", "split_examples", "pack_bins", "build_row", "packed_rows", "PackedRow",
    "packed_attention", "register_attention", "linear_cross_entropy", "supports_fast_path",
    "fast_train", "mean_context", "flops_per_token",
]
