"""Training throughput of kubetune's fast path against TRL's SFTTrainer, on one GPU.

One command on the GPU machine (wheels of trl/datasets/liger-kernel installed on PYTHONPATH,
the peer script copied to bench/peer/peer_sft_bench.py):

    python bench/bench_train.py all --out bench/results

A case under torchrun trains on every GPU of the host (FSDP2 for full, DDP for LoRA), each GPU
with the one-GPU row size, and reports the tokens/s of all of them:

    torchrun --nproc-per-node 2 bench/bench_train.py case ours llama1b full 12288 50 1 10

Every case runs in its own subprocess (clean peak-memory figures, a timeout each) and prints
one JSON line; `all` then prints the table and writes `bench/results/<date>-train-h200.json`.

Data and model are the peer's (../shared/bench/peer_sft_bench.py): random-initialised
Llama-3.2-1B shape (1.24B parameters) or SmolLM2-135M shape, 6000 synthetic examples with
lognormal lengths (median ~260 tokens, cap 2048), bf16, loss on every token.

MFU = tokens/s × FLOPs per token / 989e12 (H200 dense bf16 peak), FLOPs per token by
torchtitan's convention: 6·(N − V·d) + 12·L·d·S for full fine-tuning, 4·(N − V·d) + 12·L·d·S
for LoRA (frozen weights get no weight gradient), with S = Σn²/Σn, the token-weighted mean
example length (attention is per example; S = 633 for this data). The tied lm_head is
inside V·d, so its 6·V·d FLOPs per token are not counted (torchtitan's choice, kept so that
the numbers compare with published ones).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 989e12
SHAPES = {
    # Llama-3.2-1B: the peer's model
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True),
    # Llama-3.1-8B: the peer's PEER_SHAPE=llama8b (untied head, so the head's FLOPs count)
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                    tie_word_embeddings=False, rope_theta=500000.0),
    # SmolLM2-135M: kubetune's default base model
    "smol135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
}


def peer_data(vocab: int, n: int = 6000):
    """The peer's synthetic examples, token for token (same generator, same seed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(260), 0.8, n).astype(int), 16, 2048)
    return [rng.integers(2, vocab, k).tolist() for k in lens]


def learnable_data(vocab: int, n: int = 3000, cap: int = 1024):
    """Examples a model can learn in 50 steps (a noisy fixed bigram map), for the loss check."""
    import numpy as np

    rng = np.random.default_rng(1)
    lens = np.clip(rng.lognormal(np.log(260), 0.8, n).astype(int), 16, cap)
    small = 4000
    table = rng.integers(2, small, small)
    out = []
    for k in lens:
        x = [int(rng.integers(2, small))]
        for _ in range(k - 1):
            x.append(int(table[x[-1]]) if rng.random() < 0.8 else int(rng.integers(2, small)))
        out.append(x)
    return out


def rows_of(seqs):
    return [{"input_ids": s, "labels": s, "position_ids": list(range(len(s)))} for s in seqs]


def build_model(shape: str, lora: bool, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    return model, cfg, n_params


def mfu(tps: float, shape: str, n_params: int, lora: bool, context: float) -> float:
    from kubetune.core.fastpath import flops_per_token

    s = SHAPES[shape]
    emb = s["vocab_size"] * s["hidden_size"]
    return tps * flops_per_token(n_params, emb, s["num_hidden_layers"], s["hidden_size"], context, lora) / PEAK_TFLOPS


# --------------------------------------------------------------------------- cases


def case_ours(shape: str, mode: str, tokens_per_step: int, steps: int, compile: bool, warm: int,
              optimizer: str = "adamw_torch", recompute: float = 0.0):
    """Our fast path; `recompute` = share of decoder layers under activation checkpointing."""
    import torch

    from kubetune.core.fastpath import fast_train, mean_context

    lora = mode == "lora"
    model, cfg, n_params = build_model(shape, lora)
    seqs = peer_data(cfg.vocab_size)
    n_ac = round(recompute * cfg.num_hidden_layers)
    r = fast_train(model, rows_of(seqs), max_steps=steps, lr=1e-5 if not lora else 1e-4,
                   tokens_per_step=tokens_per_step, compile=compile, timing_warmup=warm, optimizer=optimizer,
                   activation_checkpointing=list(range(n_ac)))
    ctx = mean_context([len(s) for s in seqs])
    return {"who": "kubetune", "shape": shape, "mode": mode, "tokens_per_step": tokens_per_step,
            "compile": compile, "params": n_params, "tokens_per_s": round(r["tokens_per_s"]),
            "mfu": round(mfu(r["tokens_per_s"], shape, n_params, lora, ctx), 4),
            "peak_gib": round(r["peak_mem_gib"], 2), "step_s": round(r["step_s"], 4),
            "loss_at_end": round(r["final_loss"], 4), "steps": steps, "compile_s": round(r["compile_s"], 1),
            "context_S": round(ctx, 1), "optimizer": optimizer, "recompute_layers": n_ac,
            "timed_steps": steps - warm, "torch": torch.__version__}


def case_check():
    """GPU kernels against the CPU-tested fallbacks, on the real shapes (bf16)."""
    import torch

    from kubetune.core import fastpath as fp

    out = {"who": "check"}
    torch.manual_seed(0)
    # attention: varlen FlashAttention vs per-example SDPA, forward and gradients
    H, Hkv, D, lens = 32, 8, 64, [300, 17, 1200, 5, 2048, 700]
    T = sum(lens) + 100
    import numpy as np

    row = fp.build_row([(np.arange(n), np.arange(n)) for n in lens], list(range(len(lens))), T)
    cu = row.cu_seqlens.cuda()
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    fast, _ = fp.packed_attention(None, q, k, v, None, scaling=D**-0.5, kt_cu_seqlens=cu, kt_max_seqlen=row.max_seqlen)
    g_fast = torch.autograd.grad(fast, (q, k, v), go)
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fp._per_example_attention(qf, kf, vf, cu, D**-0.5).transpose(1, 2)
    g_ref = torch.autograd.grad(ref, (qf, kf, vf), go.double())

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    out["attn_fwd_rel"] = rel(fast, ref)
    out["attn_grad_rel"] = max(rel(a, b) for a, b in zip(g_fast, g_ref))
    out["varlen_api"] = fp._VARLEN is not None and {"is_causal": fp._VARLEN[1], "enable_gqa": fp._VARLEN[2]}
    # loss: compiled chunks (bf16) vs fp64 logits path
    h = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(128256, 2048, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, 128256, (4096,), device="cuda")
    t[::7] = -100
    n = int((t != -100).sum())
    loss = fp.linear_cross_entropy(h, w, t, 1.0 / n)
    gh, gw = torch.autograd.grad(loss, (h, w))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hd @ wd.t(), t)
    rh, rw = torch.autograd.grad(ref, (hd, wd))
    out["ce_loss_rel"] = abs(float(loss) - float(ref)) / float(ref)
    out["ce_grad_rel"] = max(rel(gh, rh), rel(gw, rw))
    out["ok"] = out["attn_fwd_rel"] < 2e-2 and out["attn_grad_rel"] < 2e-2 and out["ce_loss_rel"] < 1e-3 \
        and out["ce_grad_rel"] < 2e-2
    return out


def case_loss(shape: str, mode: str, steps: int = 50, tokens_per_step: int = 8192):
    """Same init, same examples per step: fast path vs padded batches + eager attention."""
    import torch

    from kubetune.core import fastpath as fp

    lora = mode == "lora"
    lr = 3e-4 if not lora else 2e-3
    seqs = learnable_data(SHAPES[shape]["vocab_size"])
    model, cfg, n_params = build_model(shape, lora)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fast = fp.fast_train(model, rows_of(seqs), max_steps=steps, lr=lr, warmup_steps=5,
                         tokens_per_step=tokens_per_step, compile=True)["losses"]
    model.load_state_dict(init)
    del init
    # the reference sees the same rows: same packer, same seed, same order
    examples = fp.split_examples(rows_of(seqs))
    lengths = [min(len(x), tokens_per_step) for x, _ in examples]
    bins_iter = iter(_same_bins(examples, tokens_per_step))
    model.config._attn_implementation = "eager"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.0},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    sched = fp.build_scheduler("linear", opt, 5, steps)  # fast_train's default schedule
    ref = []
    for step in range(steps):
        idxs = next(bins_iter)
        n_items = sum(lengths[i] - 1 for i in idxs)
        total = torch.zeros((), device="cuda")
        idxs = sorted(idxs, key=lambda i: lengths[i])
        for mb in _micro(idxs, lengths, 4096):
            L = max(lengths[i] for i in mb)
            ids = torch.zeros(len(mb), L, dtype=torch.long)
            lab = torch.full((len(mb), L), -100)
            am = torch.zeros(len(mb), L, dtype=torch.long)
            for j, i in enumerate(mb):
                x = torch.as_tensor(examples[i][0][: lengths[i]])
                ids[j, : len(x)], lab[j, : len(x)], am[j, : len(x)] = x, x, 1
            loss = model(input_ids=ids.cuda(), attention_mask=am.cuda(), labels=lab.cuda(),
                         num_items_in_batch=torch.tensor(n_items, device="cuda")).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ref.append(float(total))
    last = min(10, steps)
    return {"who": "losscheck", "shape": shape, "mode": mode, "steps": steps, "lr": lr,
            "fast_first": round(fast[0], 4), "ref_first": round(ref[0], 4),
            "fast_at_end": round(fast[-1], 4), "ref_at_end": round(ref[-1], 4),
            "rel_diff_at_end": round(abs(fast[-1] - ref[-1]) / ref[-1], 4),
            "max_rel_diff_last10": round(max(abs(a - b) / b for a, b in zip(fast[-last:], ref[-last:])), 4),
            "fast_losses": [round(x, 4) for x in fast], "ref_losses": [round(x, 4) for x in ref]}


def _same_bins(examples, capacity):
    """The bin sequence `fast_train` draws (`packed_bins` with seed 0), as index lists."""
    from kubetune.core.fastpath import packed_bins

    return packed_bins([min(len(x), capacity) for x, _ in examples], capacity, 0)


def _micro(idxs, lengths, budget):
    """Group examples (sorted by length) into padded micro-batches of ≤ budget padded tokens."""
    mb = []
    for i in idxs:
        if mb and (len(mb) + 1) * lengths[i] > budget:
            yield mb
            mb = []
        mb.append(i)
    if mb:
        yield mb


def case_profile(shape: str, mode: str, tokens_per_step: int):
    """Where the time goes: kernel time by category over 3 profiled steps, and GPU busy share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kubetune.core.fastpath import fast_train

    lora = mode == "lora"
    model, cfg, _ = build_model(shape, lora)
    rows = rows_of(peer_data(cfg.vocab_size))
    fast_train(model, rows, max_steps=6, lr=1e-5, tokens_per_step=tokens_per_step, compile=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fast_train(model, rows, max_steps=3, lr=1e-5, tokens_per_step=tokens_per_step, compile=True,
                   timing_warmup=0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    cats: dict[str, float] = {}
    rows_out = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        n = e.key.lower()
        cat = ("attention (flash varlen)" if "flash" in n else
               "matmul (cuBLAS/CUTLASS)" if any(s in n for s in ("gemm", "cutlass", "nvjet", "xmma", "sm90")) else
               "optimizer (fused AdamW)" if "adam" in n else
               "compiled pointwise/norm (triton)" if "triton" in n else
               "memcpy/memset" if "memcpy" in n or "memset" in n else
               "other eager kernels")
        cats[cat] = cats.get(cat, 0.0) + us / 1e3
        rows_out.append((us / 1e3, e.count, e.key[:110]))
    rows_out.sort(reverse=True)
    gpu_ms = sum(cats.values())
    top = "\n".join(f"{ms:9.1f} ms {c:6d}x  {k}" for ms, c, k in rows_out[:40])
    Path(os.environ.get("BENCH_PROFILE_TXT", "/tmp/profile.txt")).write_text(
        f"{shape} {mode} tokens/step {tokens_per_step}: 3 steps, wall {wall*1e3:.0f} ms (incl. host setup), "
        f"GPU kernel time {gpu_ms:.0f} ms\n{json.dumps(cats, indent=1)}\n\ntop kernels:\n{top}\n")
    return {"who": "profile", "shape": shape, "mode": mode, "tokens_per_step": tokens_per_step,
            "wall_ms_3_steps": round(wall * 1e3), "gpu_kernel_ms": round(gpu_ms),
            "by_category_ms": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}}


def case_peer(shape: str, config: str):
    """TRL's SFTTrainer through the peer script (for SmolLM2, a copy with the shape swapped)."""
    src = ROOT / "bench" / "peer" / "peer_sft_bench.py"
    script = src
    if shape == "smol135m":
        text = src.read_text()
        text = text.replace("V = 128256", "V = 49152").replace(
            "cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,\n"
            "                      num_attention_heads=32, num_key_value_heads=8, vocab_size=V,\n"
            "                      max_position_embeddings=4096,",
            "cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,\n"
            "                      num_attention_heads=9, num_key_value_heads=3, vocab_size=V,\n"
            "                      max_position_embeddings=8192,")
        assert "hidden_size=576" in text, "peer script changed: cannot swap in the SmolLM2 shape"
        script = src.with_name("peer_sft_bench_smol135m.py")
        script.write_text(text)
    env = os.environ | ({"PEER_SHAPE": "llama8b"} if shape == "llama8b" else {})
    r = subprocess.run([sys.executable, str(script), "one", config], capture_output=True, text=True, timeout=400,
                       env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"who": "trl", "shape": shape, "config": config, "error": r.stderr[-1500:]}
    res = json.loads(lines[-1])
    lora = config.startswith("lora")
    ctx = _context(shape)
    return {"who": "trl", "shape": shape, "mode": "lora" if lora else "full", "config": config,
            "params": res["params"], "tokens_per_s": res["tokens_per_s"],
            "mfu": round(mfu(res["tokens_per_s"], shape, res["params"], lora, ctx), 4),
            "peak_gib": res["peak_gib"], "step_s": res["step_s"], "attn": res.get("attn")}


def _context(shape):
    from kubetune.core.fastpath import mean_context

    return mean_context(_peer_lengths())


def _peer_lengths():
    import numpy as np

    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(np.log(260), 0.8, 6000).astype(int), 16, 2048).tolist()


# --------------------------------------------------------------------------- driver


def run_case(spec: list[str], timeout: int) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "case", *spec], capture_output=True, text=True,
                           timeout=timeout, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines else {"case": spec, "error": r.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        res = {"case": spec, "error": f"timeout after {timeout}s"}
    res["case_wall_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(res), flush=True)
    return res


def table(results: list[dict]) -> str:
    lines = ["| model | method | who | config | tokens/s | MFU | peak GiB | vs TRL tokens/s | vs TRL memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    peers = {(r["shape"], r["mode"]): r for r in results if r.get("who") == "trl" and "tokens_per_s" in r}
    for r in results:
        if r.get("who") not in ("trl", "kubetune") or "tokens_per_s" not in r:
            continue
        p = peers.get((r["shape"], r["mode"]))
        cfg = r.get("config") or f"packed {r['tokens_per_step']}/step{' +compile' if r['compile'] else ''}"
        ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        mem = f"{r['peak_gib'] / p['peak_gib']:.2f}x" if p else "-"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['who']} | {cfg} | {r['tokens_per_s']:,} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} | {mem} |")
    for r in results:
        if r.get("who") == "losscheck":
            lines.append(f"\nloss check {r['shape']} {r['mode']}: step {r['steps']} fast {r['fast_at_end']} vs "
                         f"reference (padded, eager) {r['ref_at_end']}: {100 * r['rel_diff_at_end']:.2f}% apart "
                         f"(first step {r['fast_first']} vs {r['ref_first']})")
    return "\n".join(lines)


PLANS = {
    # the final side-by-side run: ~9 minutes on one H200. Rows of 12288 tokens keep peak
    # memory under 0.7x / 0.6x of TRL's (16384 was faster but over: docs/performance.md).
    "all": [
        (["check"], 90),
        (["peer", "llama1b", "full_packed_liger"], 150),
        (["ours", "llama1b", "full", "12288", "50", "1", "10"], 120),
        (["peer", "llama1b", "lora_packed_liger"], 150),
        (["ours", "llama1b", "lora", "12288", "50", "1", "10"], 120),
        (["peer", "smol135m", "full_packed_liger"], 120),
        (["ours", "smol135m", "full", "16384", "50", "1", "10"], 90),
        (["peer", "smol135m", "lora_packed_liger"], 120),
        (["ours", "smol135m", "lora", "16384", "50", "1", "10"], 90),
        (["ours", "llama1b", "full", "8192", "50", "1", "10"], 90),
    ],
    # the loss check (50 steps, fast path vs padded batches + eager attention)
    "loss": [(["loss", "llama1b", "full"], 200), (["loss", "llama1b", "lora"], 200)],
    # the 8B shape on one H200 (~9 min): LoRA against TRL's best that fits, and full fine-tuning
    "llama8b": [
        (["ours", "llama8b", "lora", "8192", "30", "1", "8"], 150),
        (["peer", "llama8b", "lora_packed_liger"], 330),
        (["ours", "llama8b", "full", "8192", "30", "1", "8"], 170),
    ],
}


def _init_torchrun() -> tuple[int, int]:
    """Under torchrun (several GPUs): one NCCL process group, one GPU per process."""
    if "LOCAL_RANK" not in os.environ:
        return 1, 0
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    return dist.get_world_size(), dist.get_rank()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", help="a plan name (all), 'plan' with --cases, or 'case'")
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--cases", default=None, help="plan as JSON list of [spec, timeout]")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip cases once this much wall time is spent")
    a = ap.parse_args(argv)
    if a.what == "case":
        kind, *args = a.rest
        world, rank = _init_torchrun()
        if kind == "ours":
            shape, mode, tps, steps, comp, warm, *more = args
            res = case_ours(shape, mode, int(tps), int(steps), comp == "1", int(warm), *more[:1],
                            *[float(x) for x in more[1:2]])
        elif kind == "check":
            res = case_check()
        elif kind == "loss":
            res = case_loss(*args)
        elif kind == "profile":
            res = case_profile(args[0], args[1], int(args[2]))
        elif kind == "peer":
            res = case_peer(*args)
        else:
            raise SystemExit(f"unknown case {kind}")
        if world > 1 and "mfu" in res:
            res.update(gpus=world, mfu=round(res["mfu"] / world, 4))  # tokens/s is of all GPUs
        if rank == 0:
            print(json.dumps(res), flush=True)
        return
    plan = [tuple(x) for x in json.loads(a.cases)] if a.cases else PLANS[a.what]
    t0 = time.perf_counter()
    results = []
    for spec, timeout in plan:
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 30:
            results.append({"case": spec, "error": "skipped: out of time budget"})
            continue
        results.append(run_case(spec, int(min(timeout, left))))
    text = table(results)
    print("\n" + text, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    (out / f"{stamp}-train-{a.what}.json").write_text(json.dumps({"results": results, "table": text}, indent=1))


if __name__ == "__main__":
    main()
