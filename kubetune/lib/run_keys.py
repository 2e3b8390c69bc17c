"""What a result depends on, as one hash each: reuse a result only when its key matches.

- ``code_hash()``: the installed kubetune package's source. Metric, decoding or training code
  changes between two runs of the same version number (``__version__`` is a constant between
  releases), so every key below includes the source itself.
- ``run_key``: data (content and split) + everything else that shapes the model (base model,
  method, steps, settings: the pipeline's parameters) + code. A pipeline skips training only
  when the champion was made under the same key.
- ``eval_key``: validation data + evaluate settings + code. ``evaluate`` reuses the champion's
  recorded scores only under the same key.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """SHA-256 (16 hex) of every ``.py`` file of the installed kubetune package (with its
    components and pipelines, which an editable install maps from other folders)."""
    import importlib.util

    files: dict[str, Path] = {}
    for package in ("kubetune", "kubetune.components", "kubetune.pipelines"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            root = Path(location).resolve()
            for path in root.rglob("*.py"):
                files.setdefault(str(path.resolve()), path)
    h = hashlib.sha256()
    for key in sorted(files, key=lambda k: (Path(k).parent.name, Path(k).name, k)):
        path = files[key]
        h.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def digest(*parts: Any) -> str:
    """SHA-256 (16 hex) of JSON-able parts (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(fingerprint: str, training: str) -> str:
    """The key of one training run: data fingerprint (content and split), settings, code.

    Args:
        fingerprint: ``ingest``'s fingerprint (train and validation content, split settings).
        training: The pipeline's model-shaping parameters as text (``kubetune.ops.lifecycle.run_settings``).
    """
    return digest("run", fingerprint, training, code_hash())


def eval_key(validation_fingerprint: str, settings: dict) -> str:
    """The key of one evaluation: the validation rows, the evaluate settings, the code."""
    return digest("eval", validation_fingerprint, settings, code_hash())
