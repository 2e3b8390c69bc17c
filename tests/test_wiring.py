"""The pipeline wiring helpers: every task is placed once, and caching is off for each."""

import pytest
from kfp import dsl

from kubetune.ops.image import CPU_IMAGE
from kubetune.ops.wiring import place


@dsl.component(base_image=CPU_IMAGE)
def step(x: int) -> int:
    return x + 1


def test_place_turns_caching_off_for_every_task():
    @dsl.pipeline(name="toy")
    def toy(x: int = 1) -> int:
        first = step(x=x)
        second = step(x=first.output)
        place(None, cpu=[first], gpu=[second])
        return second.output

    tasks = toy.pipeline_spec.root.dag.tasks
    assert set(tasks) == {"step", "step-2"}
    assert all(not t.caching_options.enable_cache for t in tasks.values())


def test_place_refuses_a_task_left_out_or_named_twice():
    with pytest.raises(ValueError, match=r"\['step-2'\] of pipeline 'toy' have no role"):
        @dsl.pipeline(name="toy")
        def left_out(x: int = 1) -> int:
            first = step(x=x)
            second = step(x=first.output)
            place(None, cpu=[first])
            return second.output

    with pytest.raises(ValueError, match=r"\['step'\] named in more than one role"):
        @dsl.pipeline(name="toy")
        def twice(x: int = 1) -> int:
            first = step(x=x)
            second = step(x=first.output)
            place(None, cpu=[first, second], once=[first])
            return second.output
