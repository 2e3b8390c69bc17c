"""kubetune: LLM fine-tuning as Kubeflow Pipelines, runnable locally with kfp.local."""

__version__ = "0.1.0"
