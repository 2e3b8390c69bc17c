"""Running pipelines: locally through kfp.local, on a cluster (profiles, image, submit, schedule), and the checks before either."""
