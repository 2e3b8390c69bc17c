"""What `kubetune run` shows: one line per task, a progress bar while training, parameters' help.

kfp.local prints, for every task, its executor input and outputs as JSON, the task's whole log,
and a RuntimeWarning about the image not being a Python image (our one image is, under another
name). All of it goes to a log file instead (``.kubetune/logs/``); the terminal gets one line
per finished task (name, status, seconds, key metric) and, while a training task runs, a bar
driven by the trainer's own progress lines. ``--verbose`` streams the full log as before.

kfp.local prints task output with ``print`` and logs through a handler on ``sys.stdout``, both
resolved at call time, so replacing ``sys.stdout``/``sys.stderr`` for the run catches all of it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
# The trainer's tqdm line has no description (" 40%|####      | 12/30 [00:10<00:15, ..."); other bars
# in a training task (loading weights, tokenizing) have one and are not training progress.
_STEP = re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")
_OUTPUT = re.compile(r"^\s{4}(\w+): (.*)$")
_URI = re.compile(r"uri='([^']+)'")
# Tasks whose progress lines are the trainer's (the only long steps with a step count).
TRAINING = ("train", "dpo", "ppo", "reward", "sft", "instruction-sft")


class TaskLines(io.TextIOBase):
    """A stream that keeps everything in the log file and tells the terminal what each task did."""

    def __init__(self, log, terminal, verbose: bool = False):
        self.log, self.terminal, self.verbose = log, terminal, verbose
        self.buffer_ = ""
        self.started: dict[str, float] = {}
        self.finished: list[dict] = []
        self.current: dict | None = None  # the task whose outputs are being listed
        self.last_output: list[str] = []  # the running task's lines, shown when it fails
        self.bar = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.terminal.write(text)
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def _line(self, line: str) -> None:
        if m := _START.search(line):
            self._close_outputs()
            self.started[m.group(1)] = time.time()
            self.last_output = []
            return
        if m := _END.search(line):
            self._close_bar()
            name = m.group(1)
            seconds = time.time() - self.started.get(name, time.time())
            self.current = {"task": name, "status": m.group(2), "seconds": seconds, "outputs": {}}
            return
        if self.current is not None:
            if m := _OUTPUT.match(line):
                self.current["outputs"][m.group(1)] = m.group(2)
            elif line.startswith("      ") and self.current["outputs"]:  # an artifact's further lines (uri=...)
                last = next(reversed(self.current["outputs"]))
                self.current["outputs"][last] += " " + line.strip()
            elif line.strip().startswith("---") or not line.strip():
                if self.current["outputs"] or line.strip().startswith("---"):
                    self._close_outputs()
            return
        self.last_output = (self.last_output + [line])[-40:]
        running = next(reversed(self.started), "")
        if (m := _STEP.search(line)) and running.startswith(TRAINING) and not self.verbose:
            self._progress(running, int(m.group(1)), int(m.group(2)))

    def _progress(self, task: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            self._close_bar()
            # mininterval=0: the trainer already paces its lines; every step it reports is drawn.
            self.bar = tqdm(total=total, desc=f"  {task}", unit="step", file=self.terminal, leave=False,
                            mininterval=0, dynamic_ncols=True)
        self.bar.update(step - self.bar.n)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _close_outputs(self) -> None:
        if self.current is None:
            return
        done, self.current = self.current, None
        done["metric"] = key_metric(done["task"], done["outputs"])
        self.finished.append(done)
        if not self.verbose:
            self.terminal.write(task_line(done) + "\n")
            self.terminal.flush()

    def close_run(self) -> None:
        self._close_bar()
        if self.buffer_:
            self._line(_ANSI.sub("", self.buffer_))
            self.buffer_ = ""
        self._close_outputs()


def task_line(t: dict) -> str:
    """``  ingest               SUCCESS    3.2 s  train=240 validation=60``."""
    status = t["status"] if t["status"] == "SUCCESS" else f"{t['status']}!"
    return f"  {t['task']:<28} {status:<9} {t['seconds']:7.1f} s  {t.get('metric') or ''}".rstrip()


def _value(text: str) -> Any:
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] == "'":
        # kfp.local quotes string outputs without escaping ('{"reason": "the base model's ..."}')
        text = text[1:-1]
        try:
            return json.loads(text)
        except ValueError:
            return text
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value
    return text


def key_metric(task: str, outputs: dict[str, str]) -> str:
    """The one number worth a glance, from a task's outputs (eval.json for evaluate)."""
    for key, text in outputs.items():
        uri = _URI.search(text)
        if key == "report" and uri and Path(uri.group(1)).is_file():
            from kubetune.errors import KubetuneError
            from kubetune.lib.report import EvalReport

            try:
                report = EvalReport.load(uri.group(1))
            except KubetuneError:  # a status line, not the place to refuse a report
                continue
            metric = report.primary_metric
            base = (report.base or {}).get(metric)
            return f"{metric} {report.candidate[metric]:.4f}" + ("" if base is None else f" (base {base:.4f})")
    out = _value(outputs.get("Output", "")) if "Output" in outputs else None
    if isinstance(out, dict):
        if "version" in out and "aliases" in out:
            return f"v{out['version']} {','.join(out.get('aliases') or [])}".strip() + \
                (f" ({out['reason']})" if out.get("reason") else "")
        if "deployed" in out:
            return f"deployed {out.get('url')}" if out["deployed"] else str(out.get("reason", ""))
        for k in ("train_loss_last", "train_loss", "loss", "accuracy", "reward_last", "val_loss"):
            if isinstance(out.get(k), (int, float)):
                return f"{k} {out[k]:.4f}"
    if "unchanged" in outputs:
        return f"data {_value(outputs.get('Output', ''))} ({'unchanged' if outputs['unchanged'] == 'True' else 'new'})"
    if isinstance(out, (bool, int, float)) or (isinstance(out, str) and len(out) < 40):
        return f"{out}"
    return ""


@contextlib.contextmanager
def task_lines(log_path: str | Path, verbose: bool = False):
    """Send the run's output to ``log_path``; show one line per task (everything with ``verbose``)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    # Warnings (kfp.local's note that our image is not named "python") go to sys.stderr: the log.
    with open(log_path, "a", buffering=1) as log:
        stream = TaskLines(log, terminal, verbose)
        old = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = stream
        try:
            yield stream
        except BaseException:
            stream.close_run()
            if not verbose and stream.last_output:
                terminal.write("  ... last lines of the failed task:\n")
                terminal.write("".join(f"    {line}\n" for line in stream.last_output[-15:]))
            terminal.write(f"  full log: {log_path}\n")
            raise
        finally:
            sys.stdout, sys.stderr = old
        stream.close_run()
        if not verbose:
            terminal.write(f"  full log: {log_path}\n")


# ---------------------------------------------------------------- `kubetune run NAME --help`

# Pipeline parameters that feed no single component input of the same name.
PIPELINE_ONLY = {
    "deploy": "Serve the new champion after register (KServe on a cluster, mlflow models serve locally), "
              "smoke-test it, and roll back if it fails.",
    "train_settings": "Further settings of the training step by name (validated).",
    "eval_settings": "Further settings of evaluate by name (validated), e.g. benchmarks, max_benchmark_drop.",
    "register_settings": "Further register gates by name (min_improvement, require_complete, ...).",
}


def parameter_help(module) -> list[tuple[str, str, str]]:
    """(name, default, help) of each pipeline parameter; help from the components' docstrings."""
    from kubetune import components
    from kubetune.ops.runner import parameters

    described: dict[str, str] = {}
    # The main line's components first: their words for a shared name (base_model, data_uri) fit best.
    main = ["ingest", "train_peft", "train_full", "train_moe", "tokenize_data", "evaluate", "register"]
    for name in main + [n for n in components.__all__ if n not in main]:
        spec = getattr(components, name).component_spec
        for key, inp in (spec.inputs or {}).items():
            if inp.description and key not in described:
                described[key] = inp.description
    rows = []
    for name, p in parameters(module).items():
        default = json.dumps(p.default) if isinstance(p.default, (dict, list, str)) else str(p.default)
        rows.append((name, default, PIPELINE_ONLY.get(name) or described.get(name, "")))
    return rows


def format_parameter_help(module) -> str:
    rows = parameter_help(module)
    width = max(len(r[0]) for r in rows)
    lines = [f"usage: kubetune run {module.NAME} [--set KEY=VALUE ...] [--config FILE] [--verbose]", "",
             module.DESCRIPTION, "", "parameters (--set KEY=VALUE; default in brackets):"]
    for name, default, text in rows:
        lines.append(f"  {name:<{width}}  {text} [{default}]".rstrip())
    return "\n".join(lines)


def run_help(pipeline: str | None, parser) -> str:
    """``kubetune run --help``: the command's own help, or with a pipeline name its parameters."""
    from kubetune.ops.runner import get_pipeline

    return format_parameter_help(get_pipeline(pipeline)) if pipeline else parser.format_help()
