"""Mixture of Agents: several proposer LLMs answer, an aggregator combines their answers.

Experimental. The pieces, each usable alone, one module each:

* :mod:`~kubetune.methods.moa.proposers`: proposers answer a chat conversation and return a
  :class:`Completion`. :class:`LocalProposer` runs a transformers folder (or a GGUF file)
  in-process, :class:`RegistryProposer` downloads a model registered in MLflow and runs it the
  same way, :class:`HttpProposer` calls an OpenAI-compatible ``/v1/chat/completions`` endpoint,
  which is how models served by vLLM or KServe are reached in practice. :func:`ask_all` calls
  proposers concurrently with one deadline; a proposer that fails or misses the deadline is
  dropped and named in the result, so a mixture never hangs on one slow member.
* :mod:`~kubetune.methods.moa.voting`: :func:`majority_vote` over normalised answers;
  :func:`weighted_vote` with weights from :func:`fit_weights` (the "tuning at the aggregator
  level", fitted on validation answers).
* :mod:`~kubetune.methods.moa.synthesis`: :func:`synthesize`, where an aggregator LLM reads the
  proposals under the aggregate-and-synthesise prompt of Wang et al. 2024 (arXiv:2406.04692),
  over one or more layers; :func:`build_aggregator_examples` turns (prompt, proposals,
  reference) into chat records ``{"messages": [...]}`` for the LoRA training core, so the
  aggregator can be fine-tuned on exactly the messages :func:`synthesize` sends it.
* :mod:`~kubetune.methods.moa.mixture`: :func:`mixture_answer` is one question through the
  whole mixture; :func:`comparison_table` sets a mixture against its proposers.
* :mod:`~kubetune.methods.moa.pyfunc`: the whole mixture as one MLflow pyfunc model, which calls
  :func:`mixture_answer` for each row. It is not re-exported here: it imports ``mlflow.pyfunc``,
  which a caller that only votes should not pay for; import it as ``kubetune.methods.moa.pyfunc``.
"""

from kubetune.methods.moa.mixture import (  # noqa: F401
    MODES,
    MoAAnswer,
    comparison_table,
    format_table,
    mixture_answer,
)
from kubetune.methods.moa.proposers import (  # noqa: F401
    Completion,
    HttpProposer,
    LocalProposer,
    Messages,
    Proposer,
    RegistryProposer,
    Round,
    answer_all,
    as_messages,
    ask_all,
    prompt_and_reference,
    proposer_from_spec,
    resolve_model_uri,
)
from kubetune.methods.moa.synthesis import (  # noqa: F401
    AGGREGATE_PROMPT,
    Synthesis,
    aggregate_messages,
    build_aggregator_examples,
    synthesize,
    synthesize_batch,
)
from kubetune.methods.moa.voting import (  # noqa: F401
    accuracy,
    fit_weights,
    label_set,
    majority_vote,
    normalize_answer,
    weighted_vote,
)
