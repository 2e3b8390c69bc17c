"""Out of memory and disk full on a training step: a clear error naming the step and what to
change, exit status not 0, no model written."""

from __future__ import annotations

import json
import subprocess
import sys

from _rel import HERE, child_env


def _train(tokenized, tiny_llama, tmp_path, config: dict, **fault) -> subprocess.CompletedProcess:
    spec = json.dumps({"tokenized": str(tokenized), "output": str(tmp_path / "model"), "workspace": str(tmp_path / "ws"),
                       "config": {"base_model": str(tiny_llama), "max_steps": 4, "batch_size": 2, **config}, **fault})
    return subprocess.run([sys.executable, str(HERE / "_train_job.py"), spec], capture_output=True, text=True,
                          timeout=300, env=child_env())


def _error_line(stderr: str) -> str:
    """The line the user reads: the stage error (after the traceback, among progress bars)."""
    lines = [line for line in stderr.splitlines() if line.startswith("kubetune.errors.StageError: ")]
    assert lines, stderr[-3000:]
    return lines[-1]


def test_out_of_memory_names_the_step_and_the_remedies(tokenized, tiny_llama, tmp_path):
    proc = _train(tokenized[1], tiny_llama, tmp_path, {"method": "lora"}, oom_at_step=2)
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    assert "train: out of memory at batch_size=2" in last
    for remedy in ("lower batch_size", "gradient_checkpointing", "PEFT"):
        assert remedy in last, last
    assert not (tmp_path / "model").exists()


def test_disk_full_names_the_step_and_the_remedies(tokenized, tiny_llama, tmp_path):
    # RLIMIT_FSIZE: the kernel refuses writes past 64 KiB (EFBIG), as a full disk refuses them
    # (ENOSPC); the first checkpoint of full fine-tuning (~1 MB of weights) hits it.
    proc = _train(tokenized[1], tiny_llama, tmp_path, {"method": "full", "save_steps": 2}, fsize_limit=64 * 1024)
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    assert "train: the disk is full while writing" in last and "checkpoints" in last, proc.stderr[-2000:]
    for remedy in ("free space", "KUBETUNE_WORKSPACE", "save_steps", "PEFT"):
        assert remedy in last, last
    assert not (tmp_path / "model").exists()


def test_cpu_out_of_memory_is_translated_like_cuda(tokenized, tiny_llama, tmp_path):
    """The CPU allocator's own failure (a RuntimeError, not OutOfMemoryError) gets the same clear error."""
    proc = _train(tokenized[1], tiny_llama, tmp_path, {"method": "lora"}, cpu_oom_at_step=1)
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    assert "train: out of memory at batch_size=2" in last and "DefaultCPUAllocator" in last, last
    for remedy in ("lower batch_size", "gradient_checkpointing", "PEFT"):
        assert remedy in last, last
    assert not (tmp_path / "model").exists()


def test_a_batch_that_cannot_fit_is_refused_before_the_model_loads(tokenized, tiny_llama, tmp_path):
    """The training stage itself estimates its peak (as `kubetune advise` does) against the machine's
    memory, so a pod refuses too, not only the local CLI."""
    proc = _train(tokenized[1], tiny_llama, tmp_path, {"method": "full", "batch_size": 10**9})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kubetune.errors.ConfigError: ")]
    assert lines and "batch_size=1000000000 x max_length=64 needs an estimated" in lines[-1], proc.stderr[-2000:]
    assert "GiB of the CPU" in lines[-1]
    assert not (tmp_path / "model").exists() and not (tmp_path / "ws" / "checkpoints").exists()
