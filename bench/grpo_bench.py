"""Our GRPO step (kubetune/methods/rl/grpo.py) vs TRL's GRPOTrainer, side by side in one process.

Same model (a random-init model of a named shape, saved once, loaded by both), same tokenizer,
same ticket prompts, same reward (a cheap length score, so scoring is not what is timed), same
work per step: ``prompts`` prompts x ``G`` completions of exactly ``new_tokens`` tokens (random
weights never sample EOS), LoRA r=16 on all linear layers, β=0.04 (reference log-probs with the
adapter disabled), one optimizer step per rollout in micro-batches of 16, no gradient
checkpointing, bf16 on GPU / fp32 on CPU. Ours decodes with the compiled static-cache decoder on
GPU (``ours_eager``: without it). Reported per trainer: the median step time split
into generate / log-probs (reference; and old policy if any) / train, generated tokens/s and
trained (prompt + completion) tokens/s.

    python bench/grpo_bench.py --shape llama-1b --tokenizer DIR --out bench/results/x.json
    python bench/grpo_bench.py --shape llama-1b --tokenizer DIR --only ours,ours_eager,trl --profile DIR
    python bench/grpo_bench.py --shape tiny --steps 3          # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B's layer shape (its 128k vocabulary replaced by the SmolLM2 tokenizer's 49k).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_model(shape: str, tokenizer_dir: str, root: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = root / shape
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def ticket_prompts(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "kubetune" / "data"
                                           / "tickets.jsonl").read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}] for r in rows[:n]]


def length_reward(prompts, completions, references=None, **kw):
    # A cheap reward; TRL passes completions as message lists for conversational prompts.
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(t) / 100.0 for t in texts]


def profiler():
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=acts)


def write_profile(prof, path: str) -> None:
    """The profiled step's top operators by GPU time and by host time."""
    av = prof.key_averages()
    by_device = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(av.table(sort_by=by_device, row_limit=30) + "\n\n"
                          + av.table(sort_by="self_cpu_time_total", row_limit=30))


def bench_ours(path: str, prompts, a, compiled: bool = True, tag: str = "ours") -> dict:
    from kubetune.methods.rl.grpo import Example, GRPOConfig, GRPOTrainer
    from kubetune.methods.rl.rewards import RewardSet, RewardTerm

    cfg = GRPOConfig(steps=a.steps, prompts_per_step=a.prompts, num_generations=a.G, mini_batch_size=16,
                     learning_rate=1e-5, max_new_tokens=a.new_tokens, beta=0.04, loss_type="grpo",
                     merged_generation=not a.no_merge, compiled_generation=compiled)
    rewards = RewardSet([RewardTerm("length", 1.0, length_reward, False)])
    trainer = GRPOTrainer(path, rewards, cfg)
    examples = [Example(m, None, f"prompt {i}") for i, m in enumerate(prompts)]
    steps, warm = [], []
    for s in range(a.warmup + a.steps):
        batch = examples[(s * a.prompts) % len(examples):][: a.prompts]
        prof = profiler() if a.profile and s == a.warmup + a.steps - 1 else None
        if prof is not None:
            prof.__enter__()
        sync()
        t0 = time.perf_counter()
        stats, _ = trainer.step(batch)
        sync()
        dt = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            write_profile(prof, f"{a.profile}/{a._shape}-{tag}.txt")
        if s >= a.warmup:
            steps.append({"step_s": dt, "generate_s": stats["generate_s"],
                          "logprob_s": stats["logprob_s"], "train_s": stats["train_s"],
                          "generated_tokens": stats["generated_tokens"], "trained_tokens": stats["trained_tokens"]})
        else:
            warm.append(round(dt, 2))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del trainer
    return {**summarize(steps, peak), "warmup_step_s": warm}


def bench_trl(path: str, prompts, a) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    on_gpu = torch.cuda.is_available()
    n = a.prompts * a.G
    micro = 16
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if on_gpu else torch.float32)
    ds = Dataset.from_list([{"prompt": m} for m in prompts])
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro,
            num_generations=a.G, max_completion_length=a.new_tokens, learning_rate=1e-5, beta=0.04,
            loss_type="grpo", scale_rewards="group", temperature=1.0, top_k=0, top_p=1.0,
            max_steps=a.warmup + a.steps, logging_steps=1, save_strategy="no", report_to="none",
            bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=False, disable_dropout=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds,
                              processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                           target_modules="all-linear",
                                                                           task_type="CAUSAL_LM"))
        times = {"generate_s": 0.0, "score_s": 0.0}
        tokens = {"generated": 0.0, "trained": 0.0}

        def timed(name, fn, after=None):
            def wrapper(*args, **kw):
                sync()
                t0 = time.perf_counter()
                out = fn(*args, **kw)
                sync()
                times[name] += time.perf_counter() - t0
                if after:
                    after(out)
                return out
            return wrapper

        def count(batch):
            tokens["generated"] += float(batch["completion_mask"].sum())
            tokens["trained"] += float(batch["completion_mask"].sum() + batch["prompt_mask"].sum())

        trainer._generate_single_turn = timed("generate_s", trainer._generate_single_turn)
        trainer._generate_and_score_completions = timed("score_s", trainer._generate_and_score_completions, count)
        steps = []

        class StepTimer(TrainerCallback):
            prof = None

            def on_step_begin(self, args, state, control, **kw):
                if a.profile and state.global_step == a.warmup + a.steps - 1:
                    self.prof = profiler()
                    self.prof.__enter__()
                sync()
                self.t0 = time.perf_counter()
                times.update(generate_s=0.0, score_s=0.0)
                tokens.update(generated=0.0, trained=0.0)

            def on_step_end(self, args, state, control, **kw):
                sync()
                total = time.perf_counter() - self.t0
                steps.append({"step_s": total, "generate_s": times["generate_s"],
                              "logprob_s": times["score_s"] - times["generate_s"],
                              "train_s": total - times["score_s"], "generated_tokens": tokens["generated"],
                              "trained_tokens": tokens["trained"]})
                if self.prof is not None:
                    self.prof.__exit__(None, None, None)
                    write_profile(self.prof, f"{a.profile}/{a._shape}-trl.txt")
                    self.prof = None

        trainer.add_callback(StepTimer())
        trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    del trainer, model
    return summarize(steps[a.warmup:], peak)


def summarize(steps: list[dict], peak_gib) -> dict:
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    return {
        "steps_measured": len(steps),
        "step_s": round(med["step_s"], 3),
        "generate_s": round(med["generate_s"], 3),
        "logprob_s": round(med["logprob_s"], 3),
        "train_s": round(med["train_s"], 3),
        "generated_tokens_per_step": med["generated_tokens"],
        "trained_tokens_per_step": med["trained_tokens"],
        "generated_tok_s": round(med["generated_tokens"] / med["step_s"], 1),
        "trained_tok_s": round(med["trained_tokens"] / med["step_s"], 1),
        "peak_gib": round(peak_gib, 2) if peak_gib is not None else None,
        "all_step_s": [round(s["step_s"], 3) for s in steps],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: the packaged SmolLM2-135M's)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-merge", action="store_true", help="ours: sample from the PEFT model (no merged copy)")
    p.add_argument("--only", default="ours,trl",
                   help="comma-separated: ours, ours_eager (no compiled decoding), trl; run in this order")
    p.add_argument("--profile", default="", help="folder: write a torch.profiler table of each trainer's last step")
    p.add_argument("--out", default="")
    a = p.parse_args()
    tokenizer = a.tokenizer
    if not tokenizer:
        from kubetune.core import models

        tokenizer = models.resolve(models.DEFAULT_BASE_MODEL)
    prompts = ticket_prompts(a.prompts * (a.warmup + a.steps))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    import peft
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    results = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": peft.__version__, "trl": trl_version, "settings": dict(vars(a)), "runs": []}
    with tempfile.TemporaryDirectory() as root:
        for shape in a.shape.split(","):
            path = make_model(shape, tokenizer, Path(root))
            row = {"shape": shape}
            for who in a.only.split(","):
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                a._shape = shape
                try:
                    if who == "trl":
                        row[who] = bench_trl(path, prompts, a)
                    else:
                        row[who] = bench_ours(path, prompts, a, compiled=who == "ours", tag=who)
                except Exception as e:  # noqa: BLE001 - one failed side is a row, not a lost run
                    row[who] = {"error": f"{type(e).__name__}: {e}"}
                print(shape, who, json.dumps(row[who]), flush=True)
            for who in ("ours", "ours_eager"):
                if "step_s" in row.get(who, {}) and "step_s" in row.get("trl", {}):
                    row[f"speedup_step_{who}"] = round(row["trl"]["step_s"] / row[who]["step_s"], 2)
            results["runs"].append(row)
            if a.out:  # after every shape, so a run stopped at its time limit keeps what it measured
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
