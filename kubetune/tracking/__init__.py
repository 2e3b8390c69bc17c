"""Where kubetune's MLflow code lives: runs, lineage, the offline spool, the model registry.

Callers write ``from kubetune import tracking`` and ``tracking.log_metrics(...)``; the names
below are that surface. Its parts:

* :mod:`~kubetune.tracking.server`: where MLflow is (``MLFLOW_TRACKING_URI``, else
  ``mlflow.db`` in the working directory) and whether it answers;
* :mod:`~kubetune.tracking.runs`: one parent run per pipeline run, one child run per stage,
  lineage tags, metrics, and how runs end;
* :mod:`~kubetune.tracking.spool`: what is kept on disk while the server does not answer;
* :mod:`~kubetune.tracking.registry`: versions and aliases (compare-and-set under
  :mod:`~kubetune.tracking.registry_lock`); :mod:`~kubetune.tracking.registry_ops` builds the
  gates, promote and rollback on them.

A test that replaces one of these functions with ``monkeypatch.setattr(tracking, name, ...)``
replaces what callers outside the package see; calls between the submodules look the name up
in their own module, so patch it there (e.g. ``tracking.registry``) to change those.
"""

from kubetune.tracking.registry import (  # noqa: F401
    CHALLENGER,
    CHAMPION,
    alias_history,
    download_version,
    find_version,
    get_alias,
    get_version,
    list_versions,
    move_alias,
    set_alias,
    set_version_description,
    set_version_tags,
    version_aliases,
)
from kubetune.tracking.registry_lock import LOCK_SUFFIX, alias_lock  # noqa: F401
from kubetune.tracking.runs import (  # noqa: F401
    TAG_LAUNCH,
    TAG_PIPELINE,
    TAG_PIPELINE_RUN,
    TAG_STAGE,
    RunContext,
    end_orphans,
    end_pipeline_runs,
    experiment_name,
    get_run,
    git_commit,
    image_tag,
    lineage_tags,
    log_figure,
    log_metrics,
    log_params,
    log_text,
    maybe_stage,
    pipeline_run_tags,
    set_tags,
    stage_metrics,
    stage_run,
    tag_parent,
    tag_pipeline_run,
)
from kubetune.tracking.server import (  # noqa: F401
    already_exists,
    configure,
    has_error_code,
    server_up,
    tracking_uri,
    wait_for_server,
)
from kubetune.tracking.spool import pending_spool, replay_spool  # noqa: F401
