"""One pipeline per fine-tuning method. Each module has NAME, DESCRIPTION, build(profile) and pipeline."""

from kubetune.pipelines import dpo, feature_extraction, full, grpo, instruction, moa, moe, peft, rlhf

# The CLI's list of pipelines: a plain mapping of name -> module, in the order `kubetune pipelines` shows.
PIPELINES = {m.NAME: m for m in (peft, moe, rlhf, dpo, grpo, full, instruction, feature_extraction, moa)}
