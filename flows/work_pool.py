"""The work pool dropvault's deployments run on (``dropvault work-pool``).

A process pool whose base job template takes no job variable but a run's name and labels:
the command, the environment and the working directory are fixed in the template, and the
variables schema refuses any other key (``additionalProperties: false``), so no deployment or
run sets another command or environment through job variables, and a run cannot point a
flow at other locations (``for_run``). Each flow run inherits the worker's own environment.

What it cannot stop: a deployment's *pull steps*. Prefect's process worker resolves each
flow run's flow in its own process (``prefect/workers/process.py`` passes
``load_flow_from_flow_run``), which runs the deployment's pull steps, so a Prefect API user
who creates a deployment on this pool with a ``run_shell_script`` step runs a command with
the worker's environment, keys included. Prefect's open-source server has no roles (anyone
who reaches its API can also edit the pool), so the API itself must be closed (README,
"Deploying": ``PREFECT_SERVER_API_AUTH_STRING``, an authenticating proxy, a private
network), and a key file or KMS is better than a KEK in the worker's environment.
"""

from __future__ import annotations

from typing import Any

POOL = "dropvault"
_NAME = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Name"}
_LABELS = {"additionalProperties": {"type": "string"}, "title": "Labels", "type": "object"}
BASE_JOB_TEMPLATE: dict[str, Any] = {
    "job_configuration": {
        "command": None,  # the worker's own: python -m prefect.engine
        "env": {},  # nothing added to the worker's environment
        "labels": "{{ labels }}",
        "name": "{{ name }}",
        "stream_output": True,
        "working_dir": None,
    },
    "variables": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"name": _NAME, "labels": _LABELS},
    },
}


def ensure_work_pool(name: str = POOL) -> str:
    """Create the pool with :data:`BASE_JOB_TEMPLATE`, or put the template on an existing
    process pool of that name. Returns ``created`` or ``updated``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=BASE_JOB_TEMPLATE)
            )
            return "created"
        if existing.type != "process":
            raise ValueError(f"work pool {name} is a {existing.type} pool, not a process pool")
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=BASE_JOB_TEMPLATE))
        return "updated"
