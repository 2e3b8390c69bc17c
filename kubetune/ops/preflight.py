"""Checks that run before a pipeline does: every stage's config built from the parameters, the
base model there, and the training step's memory within the machine's.

A pipeline's settings dicts (``train_settings``, ``eval_settings``, ...) reach their stage only
when that stage's pod starts; a typo in one would otherwise surface after ingest and tokenize
ran (on a cluster: after pods were scheduled), inside a long log. ``stage_configs`` walks the
compiled pipeline spec instead: for each task it takes the values the task would receive (the
pipeline's parameters, passed down through conditions and graph components, and constants),
and builds that component's config with the same function the component calls, so every
unknown key, wrong type and out-of-range value is refused by name before anything runs.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Callable

from kubetune.core.config import _check_type
from kubetune.errors import ConfigError


def _from_settings(cls: type) -> Callable[[dict, str, dict, str, dict], Any]:
    """The generic builder: the settings dict, then the task's named inputs that are fields of ``cls``
    (as the components write ``from_dict(cls, {**settings, "base_model": base_model, ...})``)."""

    def build(settings: dict, origin: str, inputs: dict, task: str, params: dict[str, str]):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"{origin}: unknown key(s) {unknown} for step {task}; known keys: {sorted(names)}")
        # The step takes these from the pipeline's own parameters; a copy in the settings would be
        # silently overruled (or overrule), so it is refused.
        shadowed = sorted(k for k in set(settings) & set(params) if k in names)
        if shadowed:
            raise ConfigError(f"{origin}: {shadowed} for step {task} come from the pipeline parameter(s) "
                              f"{[params[k] for k in shadowed]}; set them there, not in {origin}")
        hints = typing.get_type_hints(cls)
        explicit = {k: _check_type(k, v, hints[k], "parameters") for k, v in inputs.items() if k in names}
        # The same for a value the pipeline fixes for the step (lora_rank=16 in an SFT step): the
        # component would overrule a different copy in the settings.
        fixed = sorted(k for k in set(settings) & set(explicit) if settings[k] != explicit[k])
        if fixed:
            raise ConfigError(f"{origin}: {fixed} for step {task} are fixed by the pipeline "
                              f"({', '.join(f'{k}={explicit[k]!r}' for k in fixed)}) and would be ignored")
        values = {k: _check_type(k, v, hints[k], origin) for k, v in settings.items()}
        values.update(explicit)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"step {task}: {e}") from None

    return build


def _moe(settings: dict, origin: str, inputs: dict, task: str, params: dict[str, str]):
    from kubetune.stages.train_moe import moe_config_from_dict

    keys = ("base_model", "num_experts", "top_k", "kind", "max_steps", "learning_rate")
    return moe_config_from_dict({**settings, **{k: inputs[k] for k in keys if k in inputs}},
                                f"{origin or 'parameters'} (step {task})")


def _builders() -> dict[str, Callable[[dict, str, dict, str, dict], Any]]:
    """Component function name -> how that component builds its config (the same call it makes)."""
    from kubetune.stages.aggregate_moa import MoAConfig
    from kubetune.stages.dpo import DPOConfig
    from kubetune.stages.embed import EmbedConfig
    from kubetune.stages.evaluate import EvaluateConfig
    from kubetune.stages.evaluate_head import EvaluateHeadConfig
    from kubetune.stages.evaluate_moa import EvaluateMoAConfig
    from kubetune.stages.evaluate_policy import EvaluatePolicyConfig
    from kubetune.stages.grpo import GRPOConfig
    from kubetune.stages.ingest import IngestConfig
    from kubetune.stages.ppo import PPOConfig
    from kubetune.stages.register import RegisterConfig
    from kubetune.stages.reward_model import RewardModelConfig
    from kubetune.stages.tokenize_data import TokenizeConfig
    from kubetune.stages.train_head import TrainHeadConfig
    from kubetune.core.train import TrainConfig

    plain = {"train_peft": TrainConfig, "train_full": TrainConfig, "evaluate": EvaluateConfig,
             "register": RegisterConfig, "tokenize_data": TokenizeConfig, "ingest": IngestConfig, "dpo": DPOConfig,
             "reward_model": RewardModelConfig, "ppo": PPOConfig, "embed": EmbedConfig, "train_head": TrainHeadConfig,
             "evaluate_head": EvaluateHeadConfig, "evaluate_policy": EvaluatePolicyConfig,
             "evaluate_moa": EvaluateMoAConfig, "aggregate_moa": MoAConfig, "grpo": GRPOConfig}
    return {**{k: _from_settings(cls) for k, cls in plain.items()}, "train_moe": _moe}


@dataclasses.dataclass
class StageConfig:
    task: str  # the task's name in the pipeline (train-peft, evaluate, ...)
    component: str  # the component function (train_peft, evaluate, ...)
    config: Any


def stage_configs(module, params: dict[str, Any]) -> list[StageConfig]:
    """Build the config of every task of pipeline ``module`` from ``params`` (defaults filled in).

    Raises:
        ConfigError: naming the setting (and the parameter it came from) that is unknown, of the
            wrong type or out of range.
    """
    from google.protobuf import json_format

    spec = json_format.MessageToDict(module.pipeline.pipeline_spec)
    builders = _builders()
    out: list[StageConfig] = []
    # each value carries the name of the pipeline parameter it came from (None: a constant)
    env = {k: (v, k) for k, v in params.items()}

    def walk(component: dict, env: dict[str, tuple[Any, str | None]]) -> None:
        for task_name, task in component.get("dag", {}).get("tasks", {}).items():
            inputs: dict[str, tuple[Any, str | None]] = {}
            for name, binding in task.get("inputs", {}).get("parameters", {}).items():
                if "componentInputParameter" in binding and binding["componentInputParameter"] in env:
                    inputs[name] = env[binding["componentInputParameter"]]
                elif "constant" in binding.get("runtimeValue", {}):
                    inputs[name] = (binding["runtimeValue"]["constant"], None)
            ref = task["componentRef"]["name"]
            child = spec["components"][ref]
            if "dag" in child:
                walk(child, inputs)
                continue
            fn = re.sub(r"-\d+$", "", ref.removeprefix("comp-")).replace("-", "_")
            if fn not in builders:
                continue
            settings, origin = inputs.pop("settings", ({}, "settings"))
            if not isinstance(settings, dict):
                raise ConfigError(f"{origin}: must be a mapping, got {type(settings).__name__}")
            values = {k: v for k, (v, _) in inputs.items()}
            from_params = {k: param for k, (_, param) in inputs.items() if param is not None}
            out.append(StageConfig(task_name, fn, builders[fn](settings, origin, values, task_name, from_params)))

    walk(spec["root"], env)
    return out


def with_defaults(module, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's parameter defaults, overridden by ``params``."""
    import inspect

    sig = inspect.signature(module.pipeline.pipeline_func)
    return {**{k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty},
            **params}


# ---------------------------------------------------------------- on this machine


def check_base_model(ref: str, source: str = "base_model") -> None:
    """A base model given as a local folder must be there (packaged names and hub ids pass)."""
    from kubetune.core import models

    if ref in models.PACKAGED:
        return
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref).expanduser()
    if path.exists() or ref.startswith(("/", ".", "~", "file://")):
        if not (path / "config.json").exists():
            why = "no such folder" if not path.exists() else "not a transformers model folder (no config.json)"
            raise ConfigError(f"{source}: {ref}: {why}")


def check_local(params: dict[str, Any], configs: list[StageConfig]) -> None:
    """The checks that need this machine: the base model folder and the training memory.

    Args:
        params: The pipeline's parameters, defaults filled in.
        configs: What ``stage_configs`` built from them.
    """
    from kubetune.core.memory_check import check_memory
    from kubetune.core.models import pick_device

    if isinstance(params.get("base_model"), str):
        check_base_model(params["base_model"])
    seq_len = next((s.config.max_length for s in configs if s.component == "tokenize_data"), None)
    device = pick_device()
    for s in configs:
        if s.component not in ("train_peft", "train_full") or not seq_len:
            continue
        cfg = s.config
        if s.component == "train_full":
            if params.get("method", "full") != "full":
                continue  # a pipeline with a method parameter runs this branch for method=full only
            cfg = dataclasses.replace(cfg, method="full")  # as the train_full stage does
        check_base_model(cfg.base_model)
        check_memory(cfg, seq_len, device, source=f"train_settings (step {s.task})")


__all__ = ["stage_configs", "with_defaults", "check_base_model", "check_local", "StageConfig"]
