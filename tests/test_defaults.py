"""Defaults stated once: the places that must restate one agree with its source, and settings
dicts are checked before a pipeline runs."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from kubetune.core.defaults import MAIN_JOB, WORKSPACE
from kubetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _signature_defaults(module) -> dict:
    sig = inspect.signature(module.pipeline.pipeline_func)
    return {k: p.default for k, p in sig.parameters.items()}


def test_peft_lora_yaml_restates_the_main_job():
    """configs/peft-lora.yaml is the main job written out for people to copy: every value it sets is
    the pipeline's default, and the pipeline's defaults are MAIN_JOB's."""
    from kubetune.pipelines import peft

    shipped = yaml.safe_load((ROOT / "configs" / "peft-lora.yaml").read_text())
    defaults = _signature_defaults(peft)
    for key, value in shipped.items():
        assert defaults[key] == value, f"configs/peft-lora.yaml: {key}={value!r}, the peft pipeline's default is " \
                                       f"{defaults[key]!r}"
    job = {"data_uri": MAIN_JOB.data_uri, "method": MAIN_JOB.method, "max_steps": MAIN_JOB.max_steps,
           "learning_rate": MAIN_JOB.learning_rate, "lora_rank": MAIN_JOB.lora_rank,
           "max_length": MAIN_JOB.max_length, "train_settings": MAIN_JOB.train_settings(),
           "eval_settings": MAIN_JOB.eval_settings()}
    assert {k: shipped[k] for k in job} == job


def test_compare_runs_the_main_job_sizes():
    """kubetune compare (config, CLI flags, cluster pipeline) gives every method the main job's sizes."""
    from kubetune.cli import build_parser
    from kubetune.pipelines import full, grpo, moe
    from kubetune.tools.compare import Budget, CompareConfig, peft_learning_rate

    cfg = CompareConfig()
    assert (cfg.data_uri, cfg.budget.steps, cfg.batch_size, cfg.max_length, cfg.eval_settings) == (
        MAIN_JOB.data_uri, MAIN_JOB.max_steps, MAIN_JOB.batch_size, MAIN_JOB.max_length, MAIN_JOB.eval_settings())
    assert Budget.parse("time:60").steps == MAIN_JOB.max_steps
    assert peft_learning_rate("lora") == MAIN_JOB.learning_rate

    args = build_parser().parse_args(["compare"])
    assert (args.data, args.steps, args.batch_size, args.max_length, args.prefix, args.out, args.seeds) == (
        cfg.data_uri, cfg.budget.steps, cfg.batch_size, cfg.max_length, cfg.prefix, cfg.out_dir, cfg.seeds)
    assert Budget.parse(args.budget) == cfg.budget

    # the full pipeline trains on the same data and sizes (at its own learning rate); moe and grpo on
    # the same data and rows
    d = _signature_defaults(full)
    assert (d["data_uri"], d["max_steps"], d["max_length"], d["train_settings"], d["eval_settings"]) == (
        MAIN_JOB.data_uri, MAIN_JOB.max_steps, MAIN_JOB.max_length, MAIN_JOB.train_settings(),
        MAIN_JOB.eval_settings())
    for module in (grpo, moe):
        d = _signature_defaults(module)
        assert (d["data_uri"], d["max_length"]) == (MAIN_JOB.data_uri, MAIN_JOB.max_length), module.NAME


def test_compare_pipeline_passes_the_shared_sizes():
    """The compiled compare pipeline hands each method the CompareConfig sizes."""
    from google.protobuf import json_format

    from kubetune.pipelines.compare import build
    from kubetune.tools.compare import CompareConfig

    cfg = CompareConfig()
    spec = json_format.MessageToDict(build(["lora"]).pipeline_spec)
    dags = [spec["root"], *(c for c in spec["components"].values() if "dag" in c)]
    task = next(t for d in dags for t in d["dag"]["tasks"].values() if t["taskInfo"]["name"] == "method-lora")
    params = task["inputs"]["parameters"]
    assert params["max_length"]["runtimeValue"]["constant"] == cfg.max_length
    assert params["train_settings"]["runtimeValue"]["constant"]["batch_size"] == cfg.batch_size
    assert params["eval_settings"]["runtimeValue"]["constant"] == cfg.eval_settings


def test_workspace_default_is_stated_once():
    """No module spells the workspace folder or its variable again; they import kubetune.core.defaults."""
    offenders = []
    for path in [*(ROOT / "kubetune").rglob("*.py"), *(ROOT / "components").rglob("*.py"),
                 *(ROOT / "pipelines").rglob("*.py")]:
        if path.name == "defaults.py" and path.parent.name == "core":
            continue
        text = path.read_text()
        if WORKSPACE in text or '"KUBETUNE_WORKSPACE"' in text or '".kubetune" / "workspace"' in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"restate the workspace default instead of importing kubetune.core.defaults: {offenders}"


def test_workspace_follows_the_environment(monkeypatch, tmp_path):
    from kubetune.tracking import spool
    from kubetune.core import defaults
    from kubetune.ops.runner import local_env

    monkeypatch.delenv(defaults.WORKSPACE_ENV, raising=False)
    assert defaults.workspace() == WORKSPACE
    assert local_env(tmp_path)[defaults.WORKSPACE_ENV] == str(tmp_path / WORKSPACE)
    monkeypatch.setenv(defaults.WORKSPACE_ENV, str(tmp_path / "ws"))
    assert defaults.workspace() == str(tmp_path / "ws")
    monkeypatch.delenv("KUBETUNE_MLFLOW_SPOOL", raising=False)
    assert spool.spool_dir().parent == tmp_path / "ws" / "mlflow-spool"


# ---------------------------------------------------------------- the methods


def test_one_method_list():
    """TrainConfig, kubetune compare and the memory estimator take the training methods from peft_methods."""
    from kubetune.core.peft_methods import METHOD_SPECS, METHODS
    from kubetune.core.train import TrainConfig
    from kubetune.tools import compare, memory

    assert METHODS == tuple(METHOD_SPECS) and all(name == s.name for name, s in METHOD_SPECS.items())
    assert typing.get_args(typing.get_type_hints(TrainConfig)["method"]) == METHODS
    assert [m for m, (pipe, _) in compare.METHODS.items() if pipe in ("full", "peft")] == list(METHODS)
    assert memory.METHODS[:len(METHODS)] == METHODS


def test_method_records_drive_the_checks():
    """The capabilities in the records are the ones the training core, fast path and estimator act on."""
    import warnings

    from kubetune.core import fastpath
    from kubetune.core.peft_methods import METHOD_SPECS, default_learning_rate, training_flags_for
    from kubetune.core.train import TrainConfig
    from kubetune.tools.memory import path_for

    for name, spec in METHOD_SPECS.items():
        assert default_learning_rate(name) == spec.learning_rate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flags = training_flags_for(name, gradient_checkpointing=True, packing=True)
        assert flags == {"gradient_checkpointing": spec.gradient_checkpointing, "packing": spec.packing}, name
        try:  # no model: a method the fast path takes gets past the method check to the model's
            blocker = fastpath.fast_path_blocker(TrainConfig(method=name), None, "cuda")
        except AttributeError:
            blocker = None
        assert (blocker is None or f"method={name}" not in blocker) == spec.fast_path, (name, blocker)
        assert (path_for(name, "cuda") == "fast") == spec.fast_path, name
    assert {m for m, s in METHOD_SPECS.items() if s.fsdp} == {"full"}
    assert {m for m, s in METHOD_SPECS.items() if s.mergeable} == {"lora", "dora"}


def test_no_scattered_method_lists():
    """Capability checks ask the records, not a hand-written tuple of method names."""
    pattern = re.compile(r"method (not )?in \((\"(full|lora|dora|qlora|adapter|prompt|prefix|ia3)\",? ?)+\)")
    offenders = []
    for rel in ("kubetune/core/train.py", "kubetune/core/fastpath.py", "kubetune/core/peft_methods.py",
                "kubetune/tools/advise.py"):
        for i, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------- the RL twins


@pytest.mark.parametrize("stage_module, stage_cls, trainer_cls, fields", [
    ("kubetune.stages.ppo", "PPOConfig", "PPOConfig",
     {"steps": "steps", "batch_size": "batch_size", "mini_batch_size": "mini_batch_size", "ppo_epochs": "ppo_epochs",
      "learning_rate": "learning_rate", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
      "kl_coef": "kl_coef", "adaptive_kl": "adaptive_kl", "target_kl": "target_kl", "whiten_rewards": "whiten_rewards",
      "cliprange": "cliprange", "vf_coef": "vf_coef", "lora_rank": "lora_r", "target_modules": "lora_target_modules",
      "seed": "seed"}),
    ("kubetune.stages.dpo", "DPOConfig", "DPOConfig",
     {"beta": "beta", "max_steps": "max_steps", "epochs": "epochs", "learning_rate": "learning_rate",
      "batch_size": "batch_size", "sft_weight": "sft_weight", "max_length": "max_length", "lora_rank": "lora_r",
      "seed": "seed"}),
    ("kubetune.stages.reward_model", "RewardModelConfig", "RewardModelConfig",
     {"max_steps": "max_steps", "epochs": "epochs", "learning_rate": "learning_rate", "batch_size": "batch_size",
      "max_length": "max_length", "lora_rank": "lora_r", "seed": "seed"}),
])
def test_stage_configs_are_the_trainers_defaults(stage_module, stage_cls, trainer_cls, fields):
    """A stage config and its trainer's config agree on every default they share."""
    import importlib

    from kubetune.methods.rl import settings

    stage = getattr(importlib.import_module(stage_module), stage_cls)()
    trainer = getattr(settings, trainer_cls)()
    for stage_field, trainer_field in fields.items():
        assert getattr(stage, stage_field) == getattr(trainer, trainer_field), (stage_cls, stage_field)
    if hasattr(stage, "method"):
        assert (stage.method == "lora") == trainer.use_peft


def test_ppo_stage_keeps_its_pipeline_defaults():
    """The values the pipelines ran before the twins were merged (the stage's) are the defaults."""
    from kubetune.stages.ppo import PPOConfig

    cfg = PPOConfig().trainer_settings()
    assert (cfg.steps, cfg.ppo_epochs, cfg.learning_rate, cfg.max_new_tokens, cfg.temperature) == (12, 2, 1e-4, 48, 0.7)


def test_grpo_shares_ppos_sampling_fields():
    from kubetune.methods.rl.grpo import GRPOConfig
    from kubetune.methods.rl.settings import PolicySampling, PPOConfig

    shared = {f.name for f in dataclasses.fields(PolicySampling)}
    assert shared <= {f.name for f in dataclasses.fields(GRPOConfig)}
    assert shared <= {f.name for f in dataclasses.fields(PPOConfig)}
    for cls in (GRPOConfig, PPOConfig):
        with pytest.raises(ValueError, match=r"temperature must be > 0"):
            cls(temperature=0)


# ---------------------------------------------------------------- settings checked before anything runs


def _settings_params():
    from kubetune.ops.runner import parameters
    from kubetune.pipelines import PIPELINES

    return [(name, p) for name, module in PIPELINES.items() for p in parameters(module) if p.endswith("_settings")]


def test_every_pipeline_with_settings_is_covered():
    from kubetune.pipelines import PIPELINES

    assert {name for name, _ in _settings_params()} == set(PIPELINES)


@pytest.mark.parametrize("pipeline, param", _settings_params())
def test_typo_in_settings_refused_before_ingest(pipeline, param, tmp_path):
    """A misspelt settings key stops the run with its name, before any task (ingest first) starts."""
    from kubetune.ops.runner import get_pipeline, parameters, run_local

    default = parameters(get_pipeline(pipeline))[param].default or {}
    # Data that is not there: should the check ever miss the typo, ingest fails at once instead of
    # the whole pipeline training first.
    params = {param: {**default, "max_stepz": 3}, "data_uri": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ConfigError, match=rf"{param}.*'max_stepz'"):
        run_local(pipeline, params, tmp_path, verbose=False)
    assert not (tmp_path / ".kubetune").exists(), "a task ran before the settings were checked"


def test_kfp_doubles_become_ints_in_every_stage_config():
    """KFP carries dict parameters as protobuf Structs, where 8 arrives as 8.0; from_dict turns a whole
    float back into an int for every int field, so no component converts them itself."""
    from kubetune.core.config import from_dict
    from kubetune.ops import preflight
    from kubetune.stages.propose import ProposeConfig
    from kubetune.stages.train_moe import MoEConfig

    classes = {ProposeConfig, MoEConfig}
    for name in ("ppo", "dpo", "reward_model", "grpo", "train_peft", "evaluate_policy", "evaluate_moa",
                 "aggregate_moa", "embed", "train_head"):
        classes.add(inspect.getclosurevars(preflight._builders()[name]).nonlocals["cls"])
    checked = 0
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is int and isinstance(f.default, int) and not isinstance(f.default, bool):
                required = {"name": "p", "model": "m"} if cls is ProposeConfig else {}
                built = from_dict(cls, {**required, f.name: float(f.default)}, "kfp")
                value = getattr(built, f.name)
                assert type(value) is int and value == f.default, (cls.__name__, f.name, value)
                checked += 1
    assert checked > 30


def test_grpo_sweep_restates_the_grpo_pipelines_defaults():
    """bench/grpo_sweep.py copies the pipeline's GRPO and SFT defaults (it runs where kfp is not)."""
    import importlib.util
    import sys

    from kubetune.pipelines import grpo

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("grpo_sweep", ROOT / "bench" / "grpo_sweep.py")
        sweep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sweep)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    d = _signature_defaults(grpo)
    assert sweep.PIPELINE_GRPO == {"steps": d["steps"], "learning_rate": d["learning_rate"],
                                   "rewards": d["rewards"], **d["grpo_settings"]}
    # lora_rank=16 is the pipeline's constant for its SFT step
    assert sweep.PIPELINE_SFT == {"learning_rate": d["sft_learning_rate"], "lora_rank": 16, **d["sft_settings"]}
