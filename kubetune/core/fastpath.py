"""GPU fast path of the one training core: packed rows, per-example attention, fused loss.

`train_full` and `train_peft` reach this through the training core in `kubetune/core/train.py`
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

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kubetune.core.peft_methods import method_spec

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


def packed_bins(lengths: list[int], capacity: int, seed: int):
    """Endless stream of rows as example-index lists: one packing, its row order shuffled per epoch.

    A function of (lengths, capacity, seed) alone, so a resumed run finds its data position by
    drawing the rows it has already trained on, and every process of a group sees one sequence.
    """
    rng = np.random.default_rng(seed)
    bins = pack_bins(lengths, capacity)
    while True:
        for b in rng.permutation(len(bins)):
            yield bins[b]


def packed_rows(examples, capacity: int, seed: int, pad_token_id: int = 0):
    """Endless stream of packed rows (`packed_bins`, built)."""
    lengths = [min(len(x), capacity) for x, _ in examples]
    for b in packed_bins(lengths, capacity, seed):
        yield build_row(examples, b, capacity, pad_token_id)


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
        raise ValueError(f"attention '{ATTN_IMPLEMENTATION}' needs kt_cu_seqlens (use kubetune.core.fastpath)")
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


OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit")
"""`TrainConfig.optimizer` names the fast path builds itself (the rest train on the Trainer path)."""

CHECKPOINT_PREFIX = "fast-checkpoint-"


def build_optimizer(name: str, params: list, lr: float, weight_decay: float, is_cuda: bool):
    """AdamW as transformers builds it for `name`: betas (0.9, 0.999), eps 1e-8, decay on matrices.

    Raises:
        ValueError: a name outside `OPTIMIZERS`, or 8-bit AdamW without bitsandbytes/CUDA.
    """
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name in ("adamw_torch", "adamw_torch_fused"):
        # fused on CUDA for both names: the same arithmetic as the foreach kernel, one launch
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=is_cuda)
    if name in ("adamw_8bit", "adamw_bnb_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(f"optimizer '{name}' needs bitsandbytes, which is not installed") from None
        if not is_cuda:
            raise ValueError(f"optimizer '{name}' needs a CUDA device (bitsandbytes' 8-bit states)")
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    raise ValueError(f"optimizer '{name}' is not built by the fast path (it builds {', '.join(OPTIMIZERS)})")


def build_scheduler(name: str, opt, warmup_steps: int, max_steps: int):
    """transformers' own scheduler of that name, so the fast path and the Trainer follow one curve."""
    from transformers import get_scheduler

    try:
        sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    except (ValueError, TypeError) as e:  # unknown name, or one that needs arguments we do not have
        raise ValueError(f"lr_scheduler '{name}' cannot run on the fast path: {e}") from None
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(f"lr_scheduler '{name}' cannot run on the fast path: it steps on an evaluation metric")
    return sched


class _LossModule(torch.nn.Module):
    """Decoder + chunked loss as one module: the unit DDP and FSDP wrap.

    Their hooks run around a module's forward; the fast path never calls the causal LM's own
    forward (that would build the logits), so the loss is made part of this module's.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, pos, tgt, cu, max_seqlen, scale, compute_dtype, autocast: bool):
        decoder, head = self.lm.get_decoder(), self.lm.get_output_embeddings()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            hidden = decoder(
                input_ids=ids[None], position_ids=pos[None], use_cache=False, kt_cu_seqlens=cu,
                # a CPU tensor, not an int: compiled layers would specialise on an int
                kt_max_seqlen=max_seqlen,
            ).last_hidden_state[0]
        return linear_cross_entropy(hidden, head.weight, tgt, scale, compute_dtype=compute_dtype)


def _dist():
    """(world size, rank) of the running process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _wrap(module: _LossModule, layers, full: bool, world: int, is_cuda: bool):
    """One process: as is. Several: FSDP2 per decoder layer and at the root when all weights
    train (weights, gradients and AdamW states sharded), DDP for adapters (a few MB to all-reduce)."""
    if world == 1:
        return module
    if full:
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[torch.cuda.current_device()] if is_cuda else None)


def _checkpointed(forward):
    """A decoder layer's forward that keeps only its inputs and recomputes the rest in backward."""
    import functools

    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, forward, use_reentrant=False)


def last_checkpoint(root) -> "Path | None":
    """The newest complete fast-path checkpoint under `root` (renamed into place and marked)."""
    from pathlib import Path

    from kubetune.core.train import COMPLETE_MARKER

    root = Path(root)
    if not root.exists():
        return None
    done = [p for p in root.glob(CHECKPOINT_PREFIX + "*")
            if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # adapters: only the trained weights go into the checkpoint (the base loads from the model)
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _save_checkpoint(root, step: int, wrapped, opt, extra: dict, keep: int = 2) -> None:
    """Write checkpoint `step` atomically: every rank writes into `<name>.tmp` (model and optimizer
    through torch.distributed.checkpoint, sharded as trained; RNG and data position per rank),
    then rank 0 fsyncs, marks and renames it into place. A crash before the rename leaves only a
    `.tmp` folder, which `last_checkpoint` never picks."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from kubetune.core.train import commit_checkpoint
    from kubetune.lib.dataset import staging_dir, swap_in

    world, rank = _dist()
    root = Path(root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = staging_dir(final)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    msd, osd = get_state_dict(wrapped, opt, options=_state_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=world == 1)
    torch.save(extra, tmp / f"rank{rank}.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        commit_checkpoint(tmp, step)
        swap_in(tmp, final)
        older = sorted((p for p in root.glob(CHECKPOINT_PREFIX + "*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                       key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for p in older[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    if world > 1:
        dist.barrier()


def _load_checkpoint(path, wrapped, opt) -> dict:
    """Load model, optimizer and this rank's extra state (RNG, schedule, data position) from `path`."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    world, rank = _dist()
    msd, osd = get_state_dict(wrapped, opt, options=_state_options())
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path), no_dist=world == 1)
    set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options())
    own = Path(path) / f"rank{rank}.pt"
    return torch.load(own if own.exists() else Path(path) / "rank0.pt", weights_only=True)


def _agree_on_checkpoint(root):
    """Rank 0's choice of checkpoint, for every rank (they could list the folder at different times)."""
    world, rank = _dist()
    found = last_checkpoint(root) if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        box = [str(found) if found else None]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    return found


def save_sharded_model(model, out_dir) -> None:
    """Gather a model trained sharded (FSDP2) and save it whole on rank 0; every rank calls this."""
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _dist()[1] == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        model.save_pretrained(out_dir, state_dict=state)


def fast_train(
    model,
    rows: list[dict],
    *,
    max_steps: int,
    lr: float,
    tokens_per_step: int = 12288,
    grad_accum: int = 1,
    warmup_steps: int = 0,
    lr_scheduler: str = "linear",
    optimizer: str = "adamw_torch",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    compile: bool | None = None,
    activation_checkpointing: bool | list[int] = False,
    checkpoint_dir=None,
    save_steps: int = 0,
    pad_token_id: int = 0,
    timing_warmup: int | None = None,
    on_step: Callable[[int, float, float, int], None] | None = None,
    max_seconds: float = 0.0,
) -> dict:
    """Train `model` in place on packed rows; the fast core under `train_full`/`train_peft`.

    Every optimizer step sees `grad_accum` rows of exactly `tokens_per_step` tokens per process,
    each holding whole examples (longer ones are cut to `tokens_per_step`). The loss is the mean
    next-token CE over the labelled tokens of the whole step (all micro-rows, all processes), as
    transformers computes it for the same examples in a padded batch.

    Under a process group (torchrun) every process draws the same row sequence and trains its
    own `grad_accum` rows of each step's `world × grad_accum`: the run follows the one-process run
    with `grad_accum × world` rows per step. Full fine-tuning shards with FSDP2, adapters use DDP.

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
        grad_accum: rows per optimizer step and process.
        warmup_steps: warm-up steps of the schedule.
        lr_scheduler: a transformers scheduler name (`get_scheduler`): linear, cosine, constant, ...
        optimizer: one of `OPTIMIZERS`.
        weight_decay: AdamW decoupled weight decay on matrices (not on norms or biases).
        grad_clip: clip the global gradient norm to this (None: no clipping).
        seed: seeds the row order.
        compile: compile each decoder layer; default: on CUDA only.
        activation_checkpointing: recompute decoder layers in backward instead of keeping their
            activations: True = every layer, a list = those layer indices.
        checkpoint_dir: where checkpoints go; training resumes from the newest complete one.
        save_steps: checkpoint every this many steps (0 = never).
        pad_token_id: token that fills the end of a row (never attended to by real tokens,
            never in the loss).
        timing_warmup: steps left out of the throughput figure, tokens and time both
            (compilation, allocator warm-up); default min(5, max_steps // 4).
        max_seconds: stop after the step that crosses this wall-clock budget (0 = none); the
            learning-rate schedule stays laid out over max_steps.
        on_step: called as on_step(step, loss, lr, tokens) after each step (one step late on
            the device, so that reading the loss never stalls the queue).

    Returns:
        Metrics: `tokens_per_s` (real tokens of all processes, padding and warm-up steps
        excluded), `step_s`, `peak_mem_gib`, `final_loss`, `losses` (every step, also those
        before a resume), `tokens`, `steps`, `compile_s` (the first step's time, compilation
        included), `resumed_from` (step, 0 = fresh).
    """
    import torch.distributed as dist
    from transformers import AttentionInterface  # noqa: F401  (fails early if transformers is absent)

    if not supports_fast_path(model):
        raise ValueError("this model needs the reference training path (see supports_fast_path)")
    register_attention()
    world, rank = _dist()
    device = next(model.parameters()).device
    is_cuda = device.type == "cuda"
    compile = is_cuda if compile is None else compile
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    full = all(p.requires_grad for p in model.parameters())
    master_fp32 = params[0].dtype == torch.float32
    autocast = is_cuda and master_fp32
    compute_dtype = torch.bfloat16 if is_cuda else head.weight.dtype

    examples = split_examples(rows)
    if not examples:
        raise ValueError("no examples in rows")
    lengths = [min(len(x), tokens_per_step) for x, _ in examples]
    n_targets_of = [int((y[1:n] != IGNORE_INDEX).sum()) for (_, y), n in zip(examples, lengths)]
    bins = packed_bins(lengths, tokens_per_step, seed)
    timing_warmup = min(5, max_steps // 4) if timing_warmup is None else timing_warmup

    old_attn = model.config._attn_implementation
    old_training = model.training
    layers = list(getattr(decoder, "layers", []))
    recompute = (set(range(len(layers))) if activation_checkpointing is True
                 else set(activation_checkpointing or ()))
    if any(not 0 <= i < len(layers) for i in recompute):
        raise ValueError(f"activation_checkpointing: layer indices must be in 0..{len(layers) - 1}")
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.train()
    for i in recompute:
        layers[i].forward = _checkpointed(layers[i].forward)  # an instance attribute, deleted below
    if compile:
        for layer in layers:
            layer.compile()
    wrapped = _wrap(_LossModule(model), layers, full, world, is_cuda)
    train_params = [p for p in wrapped.parameters() if p.requires_grad]  # sharded ones under FSDP
    opt = build_optimizer(optimizer, train_params, lr, weight_decay, is_cuda)
    sched = build_scheduler(lr_scheduler, opt, warmup_steps, max_steps)

    start_step, losses, rows0 = 0, [], 0
    found = _agree_on_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if found:
        extra = _load_checkpoint(found, wrapped, opt)
        sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng_cpu"])
        if is_cuda and "rng_cuda" in extra:
            torch.cuda.set_rng_state(extra["rng_cuda"], device)
        start_step, losses, rows0 = int(extra["step"]), list(extra["losses"]), int(extra["rows"])
        for _ in range(rows0):  # the data position: the row sequence is a function of the seed
            next(bins)

    def to_dev(*tensors):
        # pinned + non_blocking: the copy queues behind the running step instead of waiting for it
        return [x.pin_memory().to(device, non_blocking=True) if is_cuda else x for x in tensors]

    def sync_grads(on: bool):
        if world == 1:
            return contextlib.nullcontext()
        if full:
            wrapped.set_requires_gradient_sync(on)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if on else wrapped.no_sync()

    pending = None  # (step, loss tensor, lr, tokens) reported once the next step is queued
    tokens_timed, t_start, compile_s, t_end = 0, None, 0.0, None
    timed_from = start_step + timing_warmup
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_first = time.perf_counter()
    steps_done = max_steps
    rows_done = 0
    try:
        for step in range(start_step, max_steps):
            if max_seconds and step > timed_from and time.perf_counter() - t_first > max_seconds:
                steps_done = step
                break
            if step == timed_from:
                if is_cuda:
                    torch.cuda.synchronize(device)
                t_start = time.perf_counter()
            step_bins = [next(bins) for _ in range(world * grad_accum)]
            rows_done += len(step_bins)
            n_targets = sum(n_targets_of[i] for b in step_bins for i in b)
            micro = [build_row(examples, b, tokens_per_step, pad_token_id)
                     for b in step_bins[rank * grad_accum:(rank + 1) * grad_accum]]
            # DDP and FSDP average the gradients over processes: world/N makes their mean the
            # gradient of the step's mean loss over all N target tokens.
            # Built on the host and copied like the batch: torch.tensor(x, device="cuda") would
            # wait for the queue to drain.
            (scale,) = to_dev(torch.tensor(world / max(1, n_targets)))
            step_loss = torch.zeros((), device=device)
            for k, row in enumerate(micro):
                ids, pos, tgt, cu = to_dev(row.input_ids, row.position_ids, row.targets, row.cu_seqlens)
                if compile:  # the number of examples varies per row: no recompilation for it
                    torch._dynamo.mark_dynamic(cu, 0)
                with sync_grads(k == len(micro) - 1):
                    loss = wrapped(ids, pos, tgt, cu, torch.tensor(row.max_seqlen), scale, compute_dtype, autocast)
                    loss.backward()
                step_loss += loss.detach()
            if world > 1:
                dist.all_reduce(step_loss)
                step_loss /= world
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(train_params, grad_clip, foreach=is_cuda)
            cur_lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if pending is not None:  # the previous step's loss is ready by now
                losses.append(_report(pending, on_step))
            pending = (step, step_loss, cur_lr, sum(r.n_tokens for r in micro))
            if step >= timed_from:
                tokens_timed += pending[3]
            if step == start_step:
                if is_cuda:
                    torch.cuda.synchronize(device)
                compile_s = time.perf_counter() - t_first
            if checkpoint_dir and save_steps and (step + 1) % save_steps == 0 and step + 1 < max_steps:
                losses.append(_report(pending, on_step))
                pending = None
                extra = {"step": step + 1, "rows": rows0 + rows_done, "losses": losses,
                         "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state()}
                if is_cuda:
                    extra["rng_cuda"] = torch.cuda.get_rng_state(device)
                _save_checkpoint(checkpoint_dir, step + 1, wrapped, opt, extra)
        if pending is not None:
            losses.append(_report(pending, on_step))
        if is_cuda:
            torch.cuda.synchronize(device)
        t_end = time.perf_counter()
    finally:
        model.config._attn_implementation = old_attn
        model.train(old_training)
        for i, layer in enumerate(layers):
            layer._compiled_call_impl = None  # undo layer.compile()
            if i in recompute:
                del layer.forward
    if world > 1:
        t = torch.tensor([float(tokens_timed)], device=device)
        dist.all_reduce(t)
        tokens_timed = int(t.item())
    timed_steps = steps_done - timed_from
    elapsed = (t_end - t_start) if t_start is not None else float("nan")
    return {
        "steps": steps_done,
        "tokens": int(tokens_timed),
        "tokens_per_s": tokens_timed / elapsed if timed_steps > 0 else float("nan"),
        "step_s": elapsed / timed_steps if timed_steps > 0 else float("nan"),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "losses": losses,
        "compile_s": compile_s,
        "tokens_per_step": tokens_per_step * grad_accum * world,
        "resumed_from": start_step,
    }


def _report(pending, on_step) -> float:
    step, loss_t, lr, tokens = pending
    loss = float(loss_t)
    if on_step is not None:
        on_step(step, loss, lr, tokens)
    return loss


# --------------------------------------------------------------------------- settings


SETTINGS = {
    # how the fast path honours each TrainConfig field; a field missing here sends the run to
    # the Trainer path (fast_path_blocker), so a setting added later is never silently ignored
    "base_model": "loaded by the training core, as on the Trainer path",
    "method": "full, lora, dora, adapter, ia3 (trainable = requires_grad); qlora, prompt, prefix: Trainer path",
    "max_steps": "optimizer steps; the schedule is laid out over them",
    "epochs": "turned into max_steps from the training rows before either path starts",
    "min_steps": "bounds the steps 'epochs' gives, before either path starts",
    "step_cap": "bounds the steps 'epochs' gives, before either path starts",
    "eval_steps": "validation during training: Trainer path (set > 0)",
    "evaluations": "not done on the fast path (dropped, with best_checkpoint and early stopping); eval_steps > 0 "
                   "asks for the Trainer path",
    "best_checkpoint": "needs evaluations, so the Trainer path",
    "early_stopping_patience": "needs evaluations, so the Trainer path",
    "adapter_placement": "applied by apply_method before training (both paths)",
    "learning_rate": "peak learning rate of the schedule",
    "batch_size": "rows per micro-step: one packed row of batch_size x the data's row length tokens",
    "gradient_accumulation_steps": "packed rows per optimizer step and process, loss normalised over all of them",
    "warmup_ratio": "ceil(warmup_ratio x max_steps) warm-up steps of the schedule",
    "lr_scheduler": "transformers.get_scheduler(name), the Trainer's own curve",
    "weight_decay": "AdamW decoupled decay on matrices",
    "max_grad_norm": "global gradient-norm clipping (0: none)",
    "lora_rank": "applied by apply_method before training (both paths)",
    "lora_alpha": "applied by apply_method before training (both paths)",
    "lora_dropout": "applied by apply_method; its RNG is part of every checkpoint",
    "target_modules": "applied by apply_method before training (both paths)",
    "num_virtual_tokens": "prompt/prefix only, which take the Trainer path",
    "prefix_init": "prefix only, which takes the Trainer path",
    "gradient_checkpointing": "activation checkpointing of every decoder layer",
    "optimizer": f"{', '.join(OPTIMIZERS)}; any other: Trainer path",
    "precision": "bf16/auto: bf16 weights, gradients, states; bf16-mixed: fp32 master weights, bf16 autocast; "
                 "fp32: Trainer path (the fast path computes in bf16)",
    "save_steps": "atomic checkpoint every save_steps steps; a rerun resumes from the newest",
    "max_train_seconds": "stop after the step that crosses the budget",
    "seed": "seeds the model's init (train.py) and the row order",
    "merge": "applied when the trained model is saved (both paths)",
    "fast_path": "off: Trainer path",
    "trust_remote_code": "applied when the model loads (both paths)",
    "allow_pickle": "applied when the model loads (both paths)",
}
"""Every `kubetune.core.train.TrainConfig` field and what the fast path does with it."""


def fast_path_blocker(cfg, model, device: str) -> str | None:
    """Why `cfg` must train on the Trainer path, or None when the fast path runs it faithfully.

    Args:
        cfg: a `kubetune.core.train.TrainConfig` (or a dataclass with its fields and more).
        model: the prepared model (`supports_fast_path` decides on its shape).
        device: "cuda" or "cpu".

    Raises:
        ValueError: a setting the fast path would take but cannot honour here (8-bit AdamW
            without bitsandbytes), naming the setting.
    """
    from dataclasses import fields

    unknown = [f.name for f in fields(cfg) if f.name not in SETTINGS]
    if unknown:
        return f"setting(s) {', '.join(unknown)} not implemented by the GPU fast path"
    if cfg.fast_path == "off":
        return "fast_path=off"
    if device != "cuda":
        return "no CUDA device (the fast path is the GPU engine)"
    if cfg.eval_steps:
        return f"eval_steps={cfg.eval_steps}: validation during training runs on the Trainer path"
    spec = method_spec(cfg.method)
    if not spec.fast_path:
        return (f"method={cfg.method} adds virtual tokens per row, which packed rows cannot carry"
                if spec.family == "virtual-tokens" else f"method={cfg.method}: its 4-bit matmuls are bitsandbytes' own")
    if cfg.precision == "fp32":
        return "precision=fp32: the fast path computes in bf16"
    if cfg.optimizer not in OPTIMIZERS:
        return f"optimizer={cfg.optimizer} is not built by the fast path ({', '.join(OPTIMIZERS)})"
    if cfg.optimizer in ("adamw_8bit", "adamw_bnb_8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(f"optimizer '{cfg.optimizer}' needs bitsandbytes, which is not installed") from None
    try:
        build_scheduler(cfg.lr_scheduler, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 1, 10)
    except ValueError as e:
        return str(e)
    if not supports_fast_path(model):
        return "the model's output layer is not a plain linear map (soft-capped, scaled, biased or adapted)"
    return None


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
    "packed_bins", "packed_attention", "register_attention", "linear_cross_entropy", "supports_fast_path",
    "OPTIMIZERS", "SETTINGS", "fast_path_blocker", "build_optimizer", "build_scheduler", "last_checkpoint", "save_sharded_model", "fast_train", "mean_context", "flops_per_token",
]
