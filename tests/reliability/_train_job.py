"""A training stage as its own process, for the fault tests: ``python _train_job.py SPEC_JSON``.

SPEC: tokenized, output, workspace, config (TrainConfig fields), and optional fault knobs:
``sleep_per_step`` (to be killed mid-run), ``oom_at_step`` (raise torch.OutOfMemoryError),
``cpu_oom_at_step`` (ask torch's CPU allocator for 1 PiB: its real out-of-memory RuntimeError),
``fsize_limit`` (RLIMIT_FSIZE in bytes: writes beyond it fail as on a full disk); ``ctx``
([model name, pipeline run id]) to track it in MLflow.
Prints the result metrics as JSON on the last line of stdout.
"""

import json
import resource
import sys
import time

import torch
from transformers import TrainerCallback

from kubetune.core.config import from_dict
from kubetune.tracking import RunContext
from kubetune.core.train import TrainConfig, run_training

spec = json.loads(sys.argv[1])
torch.set_num_threads(1)


class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if spec.get("sleep_per_step"):
            time.sleep(spec["sleep_per_step"])
        if spec.get("oom_at_step") == state.global_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if spec.get("cpu_oom_at_step") == state.global_step:
            torch.empty(2**50, dtype=torch.uint8)


if spec.get("fsize_limit"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize_limit"], spec["fsize_limit"]))

cfg = from_dict(TrainConfig, spec["config"], "spec")
ctx = RunContext(*spec["ctx"], "peft") if spec.get("ctx") else None
result = run_training("train_peft", cfg, spec["tokenized"], spec["output"], spec["workspace"], ctx=ctx,
                      callbacks=(Fault(),))
print(json.dumps(result.metrics))
