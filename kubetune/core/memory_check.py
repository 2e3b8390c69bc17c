"""The training step's memory against the machine's: refused before any weight is loaded.

Run by the training core at the start of a single-device run and by the preflight of
``kubetune run`` before a pipeline starts; both take the estimate from
``kubetune.tools.memory`` (what ``kubetune advise`` shows).
"""

from __future__ import annotations

from pathlib import Path

from kubetune.errors import ConfigError


def available_memory(device: str) -> int:
    """Bytes training may use on ``device``: the GPU's total memory, or the CPU's available memory
    (``MemAvailable``, capped by this container's cgroup limit when there is one)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1]
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < avail:
            avail = int(raw)
    return avail


def check_memory(cfg, seq_len: int, device: str, source: str = "train_settings") -> None:
    """Refuse a training configuration whose estimated peak memory exceeds the device's.

    The estimate is ``kubetune.tools.memory.estimate`` (what ``kubetune advise`` uses), from the model's
    config.json, before any weight is loaded. Models the estimator cannot read pass unchecked.

    Args:
        cfg: A ``TrainConfig``.
        seq_len: Tokens per row (tokenize_data's max_length).
        device: ``cuda`` or ``cpu``.
        source: Where the settings came from, for the message.
    """
    from kubetune.tools import memory

    try:
        est = memory.estimate(cfg.base_model, cfg.method, device=device, batch_size=cfg.batch_size, seq_len=seq_len,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              optimizer="adamw_8bit" if "8bit" in cfg.optimizer else "adamw",
                              lora_rank=cfg.lora_rank, target_modules=cfg.target_modules,
                              lora_dropout=cfg.lora_dropout, num_virtual_tokens=cfg.num_virtual_tokens,
                              fast_path=cfg.fast_path, dtype="fp32" if cfg.precision == "fp32" else None)
    except Exception as e:  # noqa: BLE001 - the estimate guards; a model it cannot read must still train
        print(f"kubetune: memory not checked up front ({type(e).__name__}: {e})", flush=True)
        return
    have = available_memory(device)
    if have and est.total > have:
        where = "GPU" if device == "cuda" else "CPU (available RAM)"
        raise ConfigError(
            f"{source}: batch_size={cfg.batch_size} x max_length={seq_len} needs an estimated {est.breakdown()}, "
            f"more than the {have / 2**30:.1f} GiB of the {where}; lower batch_size (and raise "
            "gradient_accumulation_steps to keep the tokens per step), lower max_length, turn on "
            "gradient_checkpointing or use a PEFT method")
