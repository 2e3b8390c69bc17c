"""Every pipeline's public surface: its parameters' names, types and defaults.

Pipeline parameters are the user's API (the CLI's ``--set``, the KFP UI's run form, schedules
and configs name them). Adding, removing, renaming or retyping one, or moving a default, is a
decision: make it here, in the same change, on purpose.
"""

from __future__ import annotations

import pytest

from kubetune.ops.runner import get_pipeline, parameters
from kubetune.pipelines import PIPELINES

# name -> (type, default), in the order the pipeline declares them
SURFACE = {
    "peft": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://tickets"),
        "method": (str, "lora"),
        "max_steps": (int, 0),
        "learning_rate": (float, 0.001),
        "lora_rank": (int, 16),
        "max_length": (int, 256),
        "model_name": (str, "tickets-peft"),
        "max_forgetting": (float, -1.0),
        "train_settings": (dict, {"batch_size": 2}),
        "eval_settings": (dict, {"max_examples": 48, "max_new_tokens": 40, "batch_size": 48}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "nodes": (int, 1),
        "deploy": (bool, False),
    },
    "moe": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://tickets"),
        "num_experts": (int, 4),
        "top_k": (int, 2),
        "kind": (str, "experts"),
        "max_steps": (int, 30),
        "learning_rate": (float, 0.0),
        "max_length": (int, 256),
        "model_name": (str, "tickets-moe"),
        "max_forgetting": (float, -1.0),
        "train_settings": (dict, {}),
        "eval_settings": (dict, {}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "deploy": (bool, False),
    },
    "rlhf": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://preferences"),
        "sft_max_steps": (int, 10),
        "sft_learning_rate": (float, 0.0),
        "reward_max_steps": (int, 24),
        "ppo_steps": (int, 10),
        "learning_rate": (float, 0.0001),
        "max_length": (int, 512),
        "model_name": (str, "rlhf-policy"),
        "reward_model_name": (str, "rlhf-reward"),
        "max_forgetting": (float, -1.0),
        "sft_settings": (dict, {"merge": True}),
        "reward_settings": (dict, {}),
        "ppo_settings": (dict, {}),
        "eval_settings": (dict, {"temperature": 0.7}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "deploy": (bool, False),
    },
    "dpo": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://preferences"),
        "max_steps": (int, 30),
        "learning_rate": (float, 0.0),
        "beta": (float, 0.1),
        "judge_max_steps": (int, 24),
        "model_name": (str, "dpo-policy"),
        "max_forgetting": (float, -1.0),
        "train_settings": (dict, {}),
        "judge_settings": (dict, {}),
        "eval_settings": (dict, {}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "deploy": (bool, False),
    },
    "grpo": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://tickets"),
        "sft_max_steps": (int, 40),
        "sft_learning_rate": (float, 0.001),
        "steps": (int, 12),
        "learning_rate": (float, 5e-05),
        "rewards": (str, "json_fields:1.0,format:0.2"),
        "max_length": (int, 256),
        "model_name": (str, "tickets-grpo"),
        "max_forgetting": (float, -1.0),
        "sft_settings": (dict, {"merge": True, "batch_size": 2}),
        "grpo_settings": (dict, {"prompts_per_step": 8, "num_generations": 4}),
        "eval_settings": (dict, {"max_examples": 48, "max_new_tokens": 40, "batch_size": 48}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "deploy": (bool, False),
    },
    "full": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://tickets"),
        "max_steps": (int, 0),
        "learning_rate": (float, 0.0),
        "max_length": (int, 256),
        "model_name": (str, "tickets-full"),
        "max_forgetting": (float, -1.0),
        "train_settings": (dict, {"batch_size": 2}),
        "eval_settings": (dict, {"max_examples": 48, "max_new_tokens": 40, "batch_size": 48}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "nodes": (int, 1),
        "deploy": (bool, False),
    },
    "instruction": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://chat"),
        "method": (str, "lora"),
        "max_steps": (int, 32),
        "learning_rate": (float, 0.0),
        "lora_rank": (int, 16),
        "max_length": (int, 256),
        "model_name": (str, "chat-instruction"),
        "max_forgetting": (float, -1.0),
        "train_settings": (dict, {}),
        "eval_settings": (dict, {"max_examples": 48, "batch_size": 48}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "deploy": (bool, False),
    },
    "feature-extraction": {
        "base_model": (str, "minilm-l6-v2"),
        "data_uri": (str, "bundled://reviews"),
        "pooling": (str, "mean"),
        "head": (str, "linear"),
        "model_name": (str, "reviews-head"),
        "embed_settings": (dict, {}),
        "train_settings": (dict, {}),
        "eval_settings": (dict, {}),
        "register_settings": (dict, {}),
        "force": (bool, False),
        "deploy": (bool, False),
    },
    "moa": {
        "base_model": (str, "smollm2-135m-instruct"),
        "data_uri": (str, "bundled://moa"),
        "proposers": (list, [
            {"name": "zero-shot", "max_new_tokens": 8},
            {"name": "lora-30", "train": {"batch_size": 2, "learning_rate": 0.002, "max_steps": 30, "lora_rank": 8,
                                          "seed": 1}, "max_length": 128, "max_new_tokens": 8},
            {"name": "lora-60", "train": {"batch_size": 2, "learning_rate": 0.002, "max_steps": 60, "seed": 2},
             "max_length": 128, "max_new_tokens": 8},
        ]),
        "mode": (str, "weighted"),
        "aggregator": (str, "smollm2-135m-instruct"),
        "tune_aggregator": (bool, False),
        "model_name": (str, "moa"),
        "moa_settings": (dict, {"max_new_tokens": 8}),
        "eval_settings": (dict, {}),
        "deploy": (bool, False),
    },
}


def test_every_pipeline_has_a_snapshot():
    assert set(SURFACE) == set(PIPELINES)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_public_parameters_are_a_decision(name):
    """A failure here means a pipeline's parameters changed: if on purpose, update SURFACE."""
    actual = {k: (p.annotation, p.default) for k, p in parameters(get_pipeline(name)).items()}
    assert actual == SURFACE[name]
    assert list(actual) == list(SURFACE[name])  # the order the CLI and the KFP UI list them in
