"""Progress bars for long steps (tqdm; quiet when KUBETUNE_NO_PROGRESS is set, e.g. in CI logs)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, disable=bool(os.environ.get("KUBETUNE_NO_PROGRESS")),
                dynamic_ncols=True, leave=False)
