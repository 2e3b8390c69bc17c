"""One `register` stage as its own process: ``python _register_job.py MODEL_DIR REPORT NAME GO_FILE``.

Waits until GO_FILE exists (so that several start together), registers, prints the summary.
"""

import json
import sys
import time
from pathlib import Path

from kubetune.stages.register import RegisterConfig, register
from kubetune.tracking import RunContext

model_dir, report, name, go = sys.argv[1:5]
while not Path(go).exists():
    time.sleep(0.01)
result = register(RegisterConfig(model_name=name), model_dir, report,
                  ctx=RunContext(name, f"concurrent-{model_dir[-1]}", "peft"))
print(json.dumps(result.summary))
