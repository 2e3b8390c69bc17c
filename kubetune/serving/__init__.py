"""Serving a registered model: MLflow pyfuncs, KServe / mlflow-serve deployment."""
