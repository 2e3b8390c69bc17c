"""The memory estimator (kubetune.tools.memory) against what training really holds.

From the exact to the whole:

1. activations: the estimator's tensor-by-tensor count against the tensors autograd really
   keeps (``saved_tensors_hooks``, alive at the end of the forward pass) on tiny Llamas, for
   every Trainer-path method, in fp32 and bf16: within 3%;
2. peak memory on the CPU: the estimate against the peak resident memory of real training
   steps (forward, backward, clipping, AdamW) measured in a subprocess: within 15%;
3. the GPU peaks recorded in docs/ (bench/results/*.json, the data behind
   docs/performance.md and docs/kubernetes.md): within 15%, the issue's tolerance.

Why resident memory, and why 15%: the CPU has no allocator statistics like
``torch.cuda.max_memory_allocated``. The measured process runs with glibc's mmap threshold
fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor of 64 KiB or more is its own
mapping, resident while alive and returned to the system when freed: the growth of the peak
resident size over the loaded model (after a warm-up step and a garbage collection) is then
the memory training adds, plus what the estimator does not count (the small tensors on the
malloc heap, Python objects, pages of the libraries that the steps touch). Those are a few
MiB against 100-160 MiB measured here; 15% leaves room for them on another libc or torch
version while still failing on a missing term (a forgotten fp32 copy of the logits, or the
optimizer states, is 20-30% of these totals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

from kubetune.tools.memory import GiB, _eager_layer_bytes, _Spec, estimate, known_model, model_shape, trainable_params

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=1024)


def _tiny_model(method: str, dtype: torch.dtype, config: dict = TINY, dropout: float = 0.05):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.core.peft_methods import PeftSettings, apply_method

    torch.manual_seed(0)
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = "sdpa"
    # prefix_init="random": no tokenizer here, and where the prefix starts changes no memory
    model = apply_method(LlamaForCausalLM(cfg).to(dtype), method,
                         PeftSettings(rank=16, dropout=dropout, prefix_init="random"))
    return model.train()


def _packed_batch(vocab: int, batch: int, seq: int) -> dict:
    """Rows of two packed examples each, as tokenize_data writes them, through the real collator."""
    from kubetune.core.train import PackedCollator

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        ids = torch.randint(4, vocab, (seq,), generator=g).tolist()
        positions = list(range(seq // 2)) + list(range(seq - seq // 2))
        rows.append({"input_ids": ids, "labels": ids, "position_ids": positions})
    return PackedCollator(0)(rows)


def _saved_bytes(model, batch: dict) -> int:
    """Bytes of the distinct tensors autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        # several tensors may share one storage (views): count it once; an address seen before
        # whose tensor has died since belongs to a new storage (a freed temporary's address)
        if key not in params and (key not in seen or seen[key][0]() is None):
            seen[key] = (weakref.ref(t), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    alive = sum(n for ref, n in seen.values() if ref() is not None)
    del loss
    return alive


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activations_match_what_autograd_keeps(dtype):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    batch, seq = 2, 64
    inputs = _packed_batch(TINY["vocab_size"], batch, seq)
    report = []
    for method in ("full", "lora", "dora", "ia3", "adapter", "prompt", "prefix"):
        for dropout in ((0.05, 0.0) if method == "lora" else (0.05,)):
            model = _tiny_model(method, torch_dtype, dropout=dropout)
            kept = _saved_bytes(model, inputs)
            est = estimate(TINY, method, device="cpu", dtype=dtype, batch_size=batch, seq_len=seq,
                           lora_dropout=dropout)
            # the trace also sees the loss's fp32 log-softmax output, one of the estimate's
            # three vocabulary-sized loss buffers (over the virtual tokens too, for prompt tuning)
            rows = seq + (20 if method == "prompt" else 0)
            predicted = est.activations + 4 * TINY["vocab_size"] * batch * rows
            report.append((method, dropout, kept, predicted, predicted / kept))
            # the parameter counts the estimate rests on are peft's and kubetune's own
            from kubetune.core.peft_methods import trainable_summary

            counts = trainable_summary(model)
            assert counts["trainable"] == est.trainable_params, (method, counts, est.trainable_params)
            assert counts["total"] == est.total_params, (method, counts, est.total_params)
    bad = [r for r in report if abs(r[4] - 1) > 0.03]
    assert not bad, "\n".join(f"{m} dropout={p}: kept {k} B, estimated {e:.0f} B ({r:.3f})" for m, p, k, e, r in report)


def test_gradient_checkpointing_keeps_each_layer_input():
    batch, seq = 2, 64
    model = _tiny_model("full", torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept = _saved_bytes(model, _packed_batch(TINY["vocab_size"], batch, seq))
    est = estimate(TINY, "full", device="cpu", dtype="fp32", batch_size=batch, seq_len=seq, gradient_checkpointing=True)
    # the estimate adds one layer recomputed in backward, which the forward pass does not keep
    spec = _Spec(method="full", b=4, cuda=False, autocast=False, dropout=0.05, rank=16, targets=(), seq=seq, prefix=0)
    one_layer = batch * seq * _eager_layer_bytes(model_shape(TINY), spec)
    predicted = est.activations - one_layer + 4 * TINY["vocab_size"] * batch * seq
    assert abs(predicted / kept - 1) < 0.03, (kept, predicted)
    no_ckpt = estimate(TINY, "full", device="cpu", dtype="fp32", batch_size=batch, seq_len=seq)
    assert est.activations < 0.75 * no_ckpt.activations


# ---------------------------------------------------------------- peak memory on the CPU, measured

_MEASURE = textwrap.dedent('''
    import gc, json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM
    from kubetune.tools.memory import cpu_rss, reset_cpu_rss_peak
    from kubetune.core.peft_methods import PeftSettings, apply_method
    from kubetune.core.train import PackedCollator

    spec = json.loads(sys.argv[1])
    B, T = spec["batch_size"], spec["seq_len"]
    out = []
    for method in spec["methods"]:
        torch.manual_seed(0)
        cfg = LlamaConfig(**spec["config"])
        cfg._attn_implementation = "sdpa"
        model = apply_method(LlamaForCausalLM(cfg), method, PeftSettings(rank=16, dropout=0.05)).train()
        g = torch.Generator().manual_seed(0)
        def rows(n, t):
            r = []
            for _ in range(n):
                ids = torch.randint(4, cfg.vocab_size, (t,), generator=g).tolist()
                positions = list(range(t // 2)) + list(range(t - t // 2))
                r.append({"input_ids": ids, "labels": ids, "position_ids": positions})
            return r
        collate = PackedCollator(0)
        params = [p for p in model.parameters() if p.requires_grad]
        # what the Trainer runs on the CPU: torch AdamW (per-tensor loop), clipping at 1.0,
        # gradients set to None after each step (model.zero_grad)
        opt = torch.optim.AdamW(params, lr=1e-4)
        model(**collate(rows(1, 16))).loss.backward()  # warm-up: libraries, kernels, caches
        model.zero_grad(set_to_none=True)
        batches = [collate(rows(B, T)) for _ in range(3)]
        gc.collect()
        base = cpu_rss()[0]
        reset_cpu_rss_peak()
        for batch in batches:  # step 1 creates the optimizer states; steps 2-3 run with them
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            model.zero_grad(set_to_none=True)
        peak = cpu_rss()[1]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        out.append({"method": method, "peak_bytes": peak - base + weights})
        del model, opt, params, batches
        gc.collect()
    print(json.dumps(out))
''')


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_estimate_matches_measured_cpu_peak(tmp_path):
    config = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=True, max_position_embeddings=1024)
    spec = {"config": config, "methods": ["full", "lora", "adapter", "ia3"], "batch_size": 2, "seq_len": 256}
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(script), json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    lines, ratios = [], []
    for row in rows:
        est = estimate(config, row["method"], device="cpu", batch_size=2, seq_len=256)
        ratio = est.total / row["peak_bytes"]
        ratios.append(ratio)
        lines.append(f"{row['method']}: measured {row['peak_bytes'] / 2**20:.1f} MiB, estimated {est.breakdown()} "
                     f"= {ratio:.3f}x")
    print("\n".join(lines))
    assert all(abs(r - 1) < 0.15 for r in ratios), "\n".join(lines)
    # the methods differ in memory as measured, and the estimate orders them the same way
    measured = {r["method"]: r["peak_bytes"] for r in rows}
    assert measured["full"] > measured["adapter"]


# ---------------------------------------------------------------- the GPU numbers in docs/


def _bench(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def test_estimate_matches_gpu_peaks_recorded_in_docs():
    """docs/performance.md: the fast path on one H200, two model sizes, full and LoRA, 8k-33k tokens."""
    shapes = {"llama1b": "llama-3.2-1b", "smol135m": "smollm2-135m"}
    rows = [r for name in ("2026-11-28-train-all-h200.json", "2026-11-28-train-explore-h200.json")
            for r in _bench(name)["results"] if r.get("who") == "kubetune" and r.get("compile")]
    assert len(rows) >= 8
    lines = []
    for r in rows:
        # bench_train builds LoRA with peft's default dropout (0) and trains one packed row per step
        est = estimate(shapes[r["shape"]], r["mode"], device="cuda", batch_size=1, seq_len=r["tokens_per_step"],
                       lora_dropout=0.0)
        assert est.path == "fast"
        assert model_shape(shapes[r["shape"]]).params == r["params"]
        lines.append((r["shape"], r["mode"], r["tokens_per_step"], r["peak_gib"], est.gib()))
    assert all(abs(e / m - 1) < 0.15 for *_, m, e in lines), lines


def test_estimate_matches_trainer_path_gpu_peak_in_docs():
    """docs/kubernetes.md: train_full on one H200 through the Trainer (fast path off), 0.9B, 8 x 512 tokens."""
    measured = _bench("2026-11-28-fsdp-2gpu-0.9B-h200x2.json")
    # bench/fsdp_2gpu.py's model: a 16-layer Llama, hidden 2048, 16 heads / 8 KV heads, tiny vocabulary
    config = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=600, tie_word_embeddings=True)
    est = estimate(config, "full", device="cuda", batch_size=8, seq_len=512, fast_path="off")
    assert est.total_params == measured["params"]
    assert abs(est.gib() / measured["1gpu"]["peak_memory_gb"] - 1) < 0.15, (est.breakdown(), measured["1gpu"])


# ---------------------------------------------------------------- shapes and sanity


def test_known_shapes_have_the_real_parameter_counts():
    assert model_shape("smollm2-135m-instruct").params == 134_515_008  # bench_train's count of the real config
    assert model_shape("llama-3.2-1b").params == 1_235_814_400
    assert abs(model_shape("7b").params / 6.738e9 - 1) < 0.005  # Llama-2-7B: 6.74B
    assert abs(model_shape("70b").params / 70.55e9 - 1) < 0.005  # Llama-3.1-70B: 70.6B
    assert known_model("no-such-model") is None


def test_estimates_move_the_right_way():
    big = dict(batch_size=1, seq_len=1024)
    full, lora, qlora = (estimate("7b", m, **big) for m in ("full", "lora", "qlora"))
    assert qlora.total < lora.total < full.total
    assert 12.5 < lora.weights / GiB < 12.9  # 6.74B bf16 weights plus fp32 adapters
    assert 3.5 < qlora.weights / GiB < 5.5  # NF4 linears, fp32 embeddings
    assert trainable_params(model_shape("7b"), "lora") == lora.trainable_params == 39_976_960
    ckpt = estimate("7b", "qlora", gradient_checkpointing=True, **big)
    assert ckpt.activations < qlora.activations / 4
    more = estimate("7b", "qlora", batch_size=4, seq_len=1024)
    assert more.activations > 3.5 * qlora.activations
    # FSDP over 4 GPUs shards the states of full fine-tuning, not the activations
    four = estimate("8b", "full", gpus=4, **big)
    one = estimate("8b", "full", **big)
    assert four.optimizer_states == pytest.approx(one.optimizer_states / 4)
    assert four.path == "fast" and one.path == "fast"  # FSDP2 inside the fast path
    # activation checkpointing on the fast path: the recomputed layers keep only their input
    ac = estimate("8b", "full", gradient_checkpointing=True, **big)
    half = estimate("8b", "full", gradient_checkpointing=True, checkpoint_layers=16, **big)
    assert ac.path == "fast" and ac.activations < half.activations < one.activations
    assert one.activations - ac.activations > 0.8 * one.activations
