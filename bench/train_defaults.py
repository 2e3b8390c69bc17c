"""How long should the default training run be? LoRA on the bundled tickets, several lengths and seeds.

The `peft` pipeline's stages called directly (no kfp.local, no MLflow): ingest with the default
grouped split (48 validation tickets in 8 answer groups), tokenize (256-token packed rows), then
for each run `kubetune.core.train.train` on the Trainer path (what a CPU runs) and the `evaluate`
stage with the pipeline's settings (48 tickets, greedy, 40 new tokens, forgetting probe). Each run
records exact match with its Wilson interval, field accuracy, validation loss, forgetting, the
steps taken and the validation-loss curve seen during training.

    python bench/train_defaults.py WORKDIR RUNS.json [--parallel N] [--threads T]

RUNS.json is a list of {"name": ..., "seed": ..., "settings": {TrainConfig fields}}; the
settings go over the pipeline's LoRA defaults (lr 1e-3, rank 16, batch 2). Runs go N at a time
(one process each, T torch threads). Results: WORKDIR/results.jsonl, one line per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIPELINE_LORA = {"method": "lora", "learning_rate": 1e-3, "lora_rank": 16, "batch_size": 2}
EVAL = {"max_examples": 48, "max_new_tokens": 40, "batch_size": 48}


def prepare(work: Path) -> None:
    from kubetune.stages.ingest import IngestConfig, ingest
    from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data

    if not (work / "tok" / "meta.json").exists():
        ingest(IngestConfig(data_uri="bundled://tickets"), work / "ds")
        tokenize_data(TokenizeConfig(max_length=256), work / "ds", work / "tok")


def one(work: Path, run: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from kubetune.core.config import from_dict
    from kubetune.core.train import TrainConfig, train
    from kubetune.stages.evaluate import EvaluateConfig, evaluate

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    curve = []

    class Curve(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            curve.append((state.global_step, round(metrics["eval_loss"], 4), round(time.perf_counter() - t0, 1)))

    cfg = from_dict(TrainConfig, {**PIPELINE_LORA, "seed": run["seed"], **run["settings"]}, run["name"])
    out = work / "runs" / f"{run['name']}-s{run['seed']}"
    t0 = time.perf_counter()
    result = train(cfg, work / "tok", out / "model", out / "ckpt", report_to_mlflow=False, callbacks=(Curve(),))
    t_train = time.perf_counter() - t0
    report = evaluate(EvaluateConfig(**EVAL), out / "model", work / "ds", work / "tok", out / "eval.json").report
    c = report["candidate"]
    row = {"name": run["name"], "seed": run["seed"], "settings": run["settings"],
           "device": "cuda" if torch.cuda.is_available() else "cpu",
           "exact_match": c["exact_match"], "exact_match_ci": [c["exact_match_ci_low"], c["exact_match_ci_high"]],
           "n": c["n"], "field_accuracy": c.get("field_accuracy"), "val_loss": c["val_loss"],
           "forgetting": report["forgetting"], "base_exact_match": report["base"].get("exact_match"),
           "base_val_loss": report["base"].get("val_loss"),
           "train": {k: v for k, v in result.metrics.items() if k in (
               "steps", "train_wall_s", "train_loss_first", "train_loss_last", "eval_loss_best",
               "eval_loss_best_step", "eval_loss_last", "evaluations", "stopped_early")},
           "eval_curve": curve, "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1),
           "samples": c.get("samples", [])[:3]}
    import shutil

    shutil.rmtree(out / "ckpt", ignore_errors=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    return row


def main(argv: list[str]) -> None:
    work, runs = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    parallel = int(argv[argv.index("--parallel") + 1]) if "--parallel" in argv else 1
    threads = argv[argv.index("--threads") + 1] if "--threads" in argv else "2"
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    results = work / "results.jsonl"

    def launch(run: dict) -> None:
        env = {**os.environ, "BENCH_THREADS": threads, "OMP_NUM_THREADS": threads}
        log = work / f"{run['name']}-s{run['seed']}.log"
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, __file__, "--one", str(work), json.dumps(run)], env=env,
                               stdout=f, stderr=subprocess.STDOUT)
        print(f"{run['name']} seed {run['seed']}: rc {p.returncode}", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(launch, runs))
    print(results.read_text() if results.exists() else "no results")


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        work = Path(sys.argv[2])
        row = one(work, json.loads(sys.argv[3]))
        with open(work / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    else:
        main(sys.argv[1:])
