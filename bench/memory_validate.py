"""Measured peak training memory against kubetune.tools.memory's estimate, per method and model size.

On the GPU machine (torch 2.11, transformers 5.17, peft 0.21; bitsandbytes for QLoRA):

    python bench/memory_validate.py --out bench/results/memory_gpu.json        # ~3 min, one H200

and, to check the script itself on any machine before spending GPU time:

    python bench/memory_validate.py --device cpu --tiny --out /tmp/memory_cpu.json   # ~1-2 min

Each case (model shape x method) runs in its own subprocess: `kubetune.core.train.train`, the function
every training stage calls, on a random-initialised model saved from a config (the memory does
not depend on the weights' values, and nothing is downloaded) and on synthetic packed rows, for
a few steps. On CUDA the core takes the fast path (full, LoRA, DoRA, IA3, adapters) or the
Trainer path (QLoRA), exactly as for a user; the peak is ``torch.cuda.max_memory_allocated``
(the fast path resets it when it starts; on the Trainer path a callback resets it when training
begins, so loading is not counted). On the CPU (the Trainer path) the peak is the growth of the
peak resident memory over steps 2 and on, plus the weights and optimizer states already there,
with glibc's mmap threshold fixed so that freed tensors leave (see tests/test_memory.py). The
parent computes the estimate for the same settings, prints a table and writes the JSON that
`kubetune advise` reads: rows of {model, method, path, batch_size, seq_len, measured_gib,
estimate_gib, ratio, ...}.

Cases run ``--jobs`` at a time (each process's peak is its own, so they can share the GPU), up to
``--budget-s`` seconds of wall time; the first cases are the ones the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M, kubetune's default base model (kubetune.tools.memory name: smollm2-135m)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    # meta-llama/Llama-3.2-1B (llama-3.2-1b)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                         tie_word_embeddings=True, head_dim=64),
    # --tiny: two small Llamas for the CPU smoke run
    "tiny-a": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=True),
    "tiny-b": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=True),
}


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def plan(device: str, tiny: bool) -> list[dict]:
    """Cases, most wanted first: 3+ methods x 2 model sizes (QLoRA if bitsandbytes is there, else DoRA)."""
    shapes = ["tiny-a", "tiny-b"] if tiny else ["smollm2-135m", "llama-3.2-1b"]
    third = "qlora" if device == "cuda" and has_bitsandbytes() else "dora"
    methods = ["full", "lora", third, "adapter", "ia3"]
    # rows of 1024 tokens, 8 per step: a step of 8192 tokens, the fast path's 19 GiB point for
    # the 1B model in docs/performance.md; the CPU smoke run uses 2 rows of 256
    batch, seq = (2, 256) if device == "cpu" else (8, 1024)
    return [dict(shape=s, method=m, batch_size=batch, seq_len=seq, steps=3 if device == "cpu" else 4)
            for m in methods for s in shapes]


# --------------------------------------------------------------------------- inputs


def make_model(folder: Path, shape: str, device: str) -> Path:
    """A random-initialised Llama of ``shape`` saved as safetensors (bf16 on CUDA, fp32 on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32).to("cpu")
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def make_rows(folder: Path, vocab: int, seq_len: int, n_rows: int) -> Path:
    """A tokenize_data-style folder: packed rows of seq_len tokens, examples of lognormal length."""
    import datasets
    import numpy as np

    from kubetune.testing import make_tiny_tokenizer

    if (folder / "meta.json").exists():
        return folder
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n_rows):
        ids, pos = [], []
        while len(ids) < seq_len:  # examples of ~260 tokens (median), as in bench/bench_train.py
            n = int(min(seq_len - len(ids), max(16, rng.lognormal(np.log(260), 0.8))))
            ids += rng.integers(4, vocab, n).tolist()
            pos += list(range(n))
        rows.append({"input_ids": ids, "labels": ids, "position_ids": pos})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(folder))
    (folder / "meta.json").write_text(json.dumps({"fingerprint": f"memory-validate-{vocab}-{seq_len}",
                                                  "shape": "text", "tokenize": {"packing": True}, "pad_token_id": 0}))
    make_tiny_tokenizer().save_pretrained(folder / "tokenizer")  # train() reads the pad id and saves it
    return folder


# --------------------------------------------------------------------------- one case (subprocess)


def run_case(spec: dict) -> dict:
    """Train a few steps through kubetune.core.train.train and report the peak (runs in a subprocess)."""
    import gc

    import torch
    from transformers import TrainerCallback

    from kubetune.tools.memory import cpu_rss, reset_cpu_rss_peak
    from kubetune.core.train import TrainConfig, train

    device = spec["device"]
    marks: dict = {}

    class Peak(TrainerCallback):
        """Trainer path: the peak from when training starts (the model's loading not counted).

        On the CPU it starts after step 1 instead: the first step also loads libraries and
        kernels into the process (tens of MiB of resident memory that are not training's), and
        what step 1 leaves behind that is training's (the optimizer states) is added back.
        """

        def on_train_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if device == "cpu" and "base" not in marks:
                gc.collect()
                marks["base"] = cpu_rss()[0]
                marks["kept"] = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
                    t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                    if torch.is_tensor(t) and t.dim() > 0)
                reset_cpu_rss_peak()

        def on_train_end(self, args, state, control, **kw):
            if device == "cpu":
                marks["peak"] = cpu_rss()[1]

    work = Path(spec["work"])
    cfg = TrainConfig(base_model=spec["model_dir"], method=spec["method"], max_steps=spec["steps"],
                      batch_size=spec["batch_size"], save_steps=spec["steps"] + 1, warmup_ratio=0.0,
                      learning_rate=1e-5)
    t0 = time.perf_counter()
    result = train(cfg, spec["rows_dir"], work / "out", work / "ckpt", report_to_mlflow=False, callbacks=(Peak(),))
    m = result.metrics
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = marks["peak"] - marks["base"] + marks["kept"]
    return {"measured_bytes": peak, "fast_path": m["fast_path"], "trainable_params": m["trainable_params"],
            "total_params": m["total_params"], "tokens_per_s": m["tokens_per_s"], "steps": m["steps"],
            "train_wall_s": round(time.perf_counter() - t0, 1)}


def subprocess_case(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if spec["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set (tests/test_memory.py)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "case", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        out = json.loads(lines[-1]) if lines and r.returncode == 0 else {"error": (r.stderr or r.stdout)[-2500:]}
    except subprocess.TimeoutExpired:
        out = {"error": f"timeout after {timeout:.0f} s"}
    out["case_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# --------------------------------------------------------------------------- driver


def estimate_for(case: dict, device: str):
    from kubetune.tools.memory import estimate, model_shape

    # kubetune.core.train's defaults: LoRA rank 16 on all linears, dropout 0.05, precision auto
    return estimate(model_shape(SHAPES[case["shape"]]) if case["shape"].startswith("tiny") else case["shape"],
                    case["method"], device=device, batch_size=case["batch_size"], seq_len=case["seq_len"])


def table(rows: list[dict]) -> str:
    lines = ["| model | method | path | tokens/step | measured GiB | estimate GiB | estimate/measured "
             "| trainable (est.) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "measured_gib" not in r:
            lines.append(f"| {r['model']} | {r['method']} | - | - | error | {r.get('estimate_gib', '-')} | - | "
                         f"{r.get('error', '')[-120:].splitlines()[-1] if r.get('error') else ''} |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['path']} | {r['batch_size'] * r['seq_len']:,} | "
                     f"{r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | {r['ratio']:.3f} | "
                     f"{r['trainable_params']:,} ({r['trainable_params_est']:,}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", default="all", help="'all' (default) or 'case' (internal)")
    ap.add_argument("spec", nargs="?", help="JSON spec of one case (internal)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_gpu.json"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU smoke run)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="cases run at once (default 3 on a GPU, where each process's peak is its own; 1 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=230, help="start no case after this much wall time")
    ap.add_argument("--work", default=None, help="folder for models and data (default: a temporary one)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the plan's methods")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the plan's model shapes")
    a = ap.parse_args(argv)
    if a.what == "case":
        print(json.dumps(run_case(json.loads(a.spec))), flush=True)
        return 0

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not a.tiny:
        print("note: full-size models on the CPU take long; --tiny is the CPU smoke run", file=sys.stderr)
    work = Path(a.work or tempfile.mkdtemp(prefix="memory-validate-"))
    methods, shapes = (set(x.split(",")) if x else None for x in (a.methods, a.shapes))
    cases = [c for c in plan(device, a.tiny)
             if (not methods or c["method"] in methods) and (not shapes or c["shape"] in shapes)]
    t0 = time.perf_counter()
    inputs = {}
    for shape in dict.fromkeys(c["shape"] for c in cases):
        seq = cases[0]["seq_len"]
        inputs[shape] = (make_model(work / f"model-{shape}", shape, device),
                         make_rows(work / f"rows-{SHAPES[shape]['vocab_size']}-{seq}", SHAPES[shape]["vocab_size"],
                                   seq, n_rows=64))
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s ({work})", flush=True)

    def one(i_case):
        i, case = i_case
        try:
            return measure(i, case)
        except Exception as e:  # one broken case must not lose the others' numbers
            return {"model": case["shape"], "method": case["method"], "batch_size": case["batch_size"],
                    "seq_len": case["seq_len"], "device": device, "error": f"{type(e).__name__}: {e}"}

    def measure(i, case):
        row = {"model": case["shape"], "method": case["method"], "batch_size": case["batch_size"],
               "seq_len": case["seq_len"], "device": device}
        est = estimate_for(case, device)
        row.update(estimate_gib=round(est.gib(), 3), path=est.path, trainable_params_est=est.trainable_params,
                   estimate_breakdown=est.breakdown())
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 20:
            row["error"] = "skipped: out of the time budget"
            return row
        model_dir, rows_dir = inputs[case["shape"]]
        spec = dict(case, device=device, model_dir=str(model_dir), rows_dir=str(rows_dir),
                    work=str(work / f"case-{i}-{case['shape']}-{case['method']}"))
        res = subprocess_case(spec, timeout=min(240, max(60, left + 60)))
        row.update(res)
        if "measured_bytes" in res:
            row["measured_gib"] = round(res["measured_bytes"] / 2**30, 3)
            row["ratio"] = round(est.total / res["measured_bytes"], 3)
            row["path"] = "fast" if res["fast_path"] else "trainer"
        print(json.dumps({k: v for k, v in row.items() if k != "estimate_breakdown"}), flush=True)
        return row

    jobs = a.jobs or (3 if device == "cuda" else 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(one, enumerate(cases)))
    done = [r for r in rows if "ratio" in r]
    text = table(rows)
    print("\n" + text, flush=True)
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([os.path.basename(__file__), *(argv or sys.argv[1:])]),
            "within_15pct": all(abs(r["ratio"] - 1) <= 0.15 for r in done) and bool(done),
            "rows": rows, "table": text}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    print(f"wrote {out}; {len(done)}/{len(rows)} cases measured; within 15%: {info['within_15pct']}", flush=True)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
