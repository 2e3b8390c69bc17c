"""The distributed launcher: a Kubeflow TrainJob (or torchrun locally) around one training call."""
