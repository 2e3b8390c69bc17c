"""The container images every kubetune component runs in, named in one place.

Components pass these constants as ``base_image`` so that nothing installs torch or
transformers at run time (``packages_to_install`` stays empty). The tag is the package
version, the same tag ``images/Makefile`` builds and pushes, so a pipeline compiled from
kubetune X.Y.Z runs the code of X.Y.Z.

Overrides (read once, at import time, because ``@dsl.component`` captures the image when
the module defining the component is imported):

* ``KUBETUNE_REGISTRY``: registry and path prefix, e.g. ``registry.example.com/ml``.
* ``KUBETUNE_IMAGE``: the whole training image reference (wins over the registry).
* ``KUBETUNE_CPU_IMAGE``: the whole CPU image reference (wins over the registry).

These are compile-time settings: a pod does not see them. Each compiled task carries the
reference it was compiled with as ``KUBETUNE_IMAGE_REF`` (``kubetune.ops.kube.stamp_lineage``),
and that is what the stage records in MLflow (``kubetune.tracking.image_tag``).
"""

from __future__ import annotations

import os

from kubetune import __version__

#: Where ``make -C images push`` puts the images unless ``REGISTRY=...`` says otherwise.
DEFAULT_REGISTRY = "ghcr.io/kubetune"

#: Image names under the registry; ``images/Makefile`` uses the same two names.
TRAIN_IMAGE_NAME = "kubetune-train"
CPU_IMAGE_NAME = "kubetune-cpu"


def image_ref(name: str, registry: str | None = None, version: str = __version__) -> str:
    """Full reference of one kubetune image.

    Args:
        name: Image name under the registry (``TRAIN_IMAGE_NAME`` or ``CPU_IMAGE_NAME``).
        registry: Registry prefix; defaults to ``$KUBETUNE_REGISTRY`` or ``DEFAULT_REGISTRY``.
        version: Tag; the package version unless testing something else.

    Returns:
        ``registry/name:version``.
    """
    registry = (registry or os.environ.get("KUBETUNE_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
    return f"{registry}/{name}:{version}"


#: CUDA + PyTorch image for the GPU stages (training, reward model, PPO, GPU evaluation).
TRAIN_IMAGE: str = os.environ.get("KUBETUNE_IMAGE") or image_ref(TRAIN_IMAGE_NAME)

#: Slim CPU image for ingest, tokenize, evaluate-on-CPU and register.
CPU_IMAGE: str = os.environ.get("KUBETUNE_CPU_IMAGE") or image_ref(CPU_IMAGE_NAME)
