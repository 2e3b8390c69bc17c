"""A quiet local run: one line per task, a training bar, full logs in a file; `kubetune run NAME --help`."""


import sys
import warnings

from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def train_tiny(steps: int) -> dict:
    """Prints like a trainer: a tqdm bar and a metrics dict.

    Args:
        steps: Steps to pretend.
    """
    import sys

    from tqdm import tqdm

    print("a very chatty line of trainer output")
    for _ in tqdm(range(3), desc="Loading weights", file=sys.stderr, mininterval=0):
        pass  # a bar that is not training progress
    for _ in tqdm(range(steps), file=sys.stderr, mininterval=0):
        pass
    return {"train_loss": 0.5, "steps": steps}


@dsl.component(base_image=CPU_IMAGE)
def report_tiny(metrics: dict) -> str:
    """Summarizes.

    Args:
        metrics: From train_tiny.
    """
    import json

    return json.dumps({"version": "3", "aliases": ["challenger", "champion"], "reason": "beats v2's 0.4"})


@dsl.pipeline(name="tiny")
def tiny(steps: int = 5) -> str:
    trained = train_tiny(steps=steps)
    return report_tiny(metrics=trained.output).output


def test_quiet_run_shows_one_line_per_task_and_logs_everything(tmp_path, capsys):
    from kfp import local

    from kubetune.ops.run_ui import task_lines

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "outputs"))
    log = tmp_path / "logs" / "tiny.log"
    with warnings.catch_warnings():
        # As outside pytest (which records warnings instead): printed to sys.stderr, every time.
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, cat, path, line, file=None, text=None: sys.stderr.write(
            warnings.formatwarning(msg, cat, path, line, text))
        with task_lines(log, verbose=False):
            tiny(steps=5)
    shown = capsys.readouterr()
    lines = [line for line in shown.out.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 3, shown.out  # two tasks and where the full log is
    assert lines[0].split()[:2] == ["train-tiny", "SUCCESS"] and lines[0].endswith("train_loss 0.5000")
    assert lines[1].split()[:2] == ["report-tiny", "SUCCESS"]
    assert lines[1].endswith("v3 challenger,champion (beats v2's 0.4)")
    assert lines[2] == f"  full log: {log}"
    assert "5/5" in shown.out  # the training bar drawn from the trainer's progress lines
    assert "3/3" not in shown.out  # and only from those
    for noise in ("RuntimeWarning", "Streamed logs", "chatty", "executor"):
        assert noise not in shown.out + shown.err
    text = log.read_text()
    assert "chatty" in text and "Executing task" in text and "train_loss" in text and "RuntimeWarning" in text


def test_verbose_run_streams_the_log(tmp_path, capsys):
    from kfp import local

    from kubetune.ops.run_ui import task_lines

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "outputs"))
    with task_lines(tmp_path / "v.log", verbose=True):
        tiny(steps=2)
    assert "chatty" in capsys.readouterr().out


def test_run_help_lists_the_pipeline_parameters_with_defaults_and_help(capsys):
    from kubetune.cli import main
    from kubetune.ops.runner import get_pipeline, parameters

    assert main(["run", "peft", "--help"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == set(parameters(get_pipeline("peft")))
    assert rows["max_steps"].endswith("Optimizer steps (0 = from the data: TrainConfig.steps_for). [0]")
    assert rows["base_model"].endswith('Base model reference. ["smollm2-135m-instruct"]')
    assert "smoke-test" in rows["deploy"] and rows["deploy"].endswith("[False]")
    assert all(line.rstrip().endswith("]") and len(line.split()) > 2 for line in rows.values())


def test_evaluate_line_reads_the_primary_metric_from_the_report_artifact(tmp_path):
    """kfp.local lists an artifact over several lines; evaluate's key metric is in the report it points to."""
    import io
    import json

    from kubetune.ops.run_ui import TaskLines

    report = tmp_path / "report"
    report.write_text(json.dumps({"primary_metric": "exact_match", "candidate": {"exact_match": 0.25},
                                  "base": {"exact_match": 0.0625}}))
    terminal = io.StringIO()
    stream = TaskLines(io.StringIO(), terminal)
    stream.write("04:12:43.619 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m\n")
    stream.write("04:35:56.407 - INFO - Task \x1b[96m'evaluate'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n")
    stream.write("04:35:56.407 - INFO - Task 'evaluate' outputs:\n")
    stream.write("    report: Artifact( name='report',\n")
    stream.write(f"                      uri='{report}',\n")
    stream.write("                      metadata={} )\n\n")
    stream.close_run()
    assert terminal.getvalue().rstrip().endswith("evaluate                     SUCCESS       0.0 s  "
                                                 "exact_match 0.2500 (base 0.0625)")
