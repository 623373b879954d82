"""Reading back what flow runs recorded on the Prefect API the tests talk to.

Artifacts and flow runs are written by direct requests, so they are there when a
flow returns; task runs and logs reach the server in the background, so the
readers of those poll until what they wait for has arrived.
"""

import json
import time

WAIT_SECONDS = 60


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _run_filter(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def table_rows(flow_run_id, key: str | None = None) -> list[dict]:
    """The rows of the one table artifact of a flow run (with `key`, if given)."""
    with _client() as client:
        artifacts = [
            artifact
            for artifact in client.read_artifacts(
                flow_run_filter=_run_filter(flow_run_id)
            )
            if artifact.type == "table" and (key is None or artifact.key == key)
        ]
    assert len(artifacts) == 1, [artifact.key for artifact in artifacts]
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data


def task_runs(flow_run_id, prefix: str, count: int, state: str | None = None) -> list:
    """The flow run's task runs whose names start with `prefix` (and, given
    `state`, that are in that state, such as "COMPLETED"), once `count` of them
    have reached the API (or after a minute, for the caller to fail on)."""
    deadline = time.monotonic() + WAIT_SECONDS
    with _client() as client:
        while True:
            runs = [
                run
                for run in client.read_task_runs(
                    flow_run_filter=_run_filter(flow_run_id)
                )
                if run.name.startswith(prefix)
                and (state is None or run.state_type == state)
            ]
            if len(runs) >= count or time.monotonic() > deadline:
                return sorted(runs, key=lambda run: run.name)
            time.sleep(0.5)


def log_messages(flow_run_id, level: int, wanted: str) -> list[str]:
    """Messages of at least `level` that the flow run logged, once one of them
    holds `wanted` (or after a minute, for the caller to fail on)."""
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterFlowRunId,
        LogFilterLevel,
    )

    log_filter = LogFilter(
        flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
        level=LogFilterLevel(ge_=level),
    )
    deadline = time.monotonic() + WAIT_SECONDS
    with _client() as client:
        while True:
            messages = [log.message for log in client.read_logs(log_filter=log_filter)]
            if any(wanted in message for message in messages):
                return messages
            if time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


def flow_run_count(flow_name: str) -> int:
    """How many runs of the flow named `flow_name` the API holds."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client() as client:
        return client.count_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))
        )


def all_flow_run_count() -> int:
    """How many flow runs of any flow the API holds."""
    with _client() as client:
        return client.count_flow_runs()


def latest_flow_runs(flow_name: str, parameter: str, value) -> list:
    """The latest runs (up to 50) of flow `flow_name` whose `parameter` is
    `value`, newest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=50,
        )
    return [run for run in runs if run.parameters.get(parameter) == value]


def flow_run_parameters(flow_name: str, parameter: str, value) -> list[dict]:
    """Parameters of the latest runs of flow `flow_name` whose `parameter` is
    `value`."""
    return [run.parameters for run in latest_flow_runs(flow_name, parameter, value)]


def flow_run_ids(flow_name: str, parameter: str, value) -> list:
    """IDs of the latest runs of flow `flow_name` whose `parameter` is `value`."""
    return [run.id for run in latest_flow_runs(flow_name, parameter, value)]


def event_names(flow_run_id, until: str) -> list[str]:
    """Names of the events about a flow run, once one named `until` has arrived
    (or after a minute, for the caller to fail on): events are stored in the
    background, in the order they reached the server."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {
        "filter": {"resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}},
        "limit": 50,
    }
    deadline = time.monotonic() + WAIT_SECONDS
    with httpx.Client(base_url=PREFECT_API_URL.value(), timeout=30) as client:
        while True:
            response = client.post("/events/filter", json=body)
            response.raise_for_status()
            names = [event["event"] for event in response.json()["events"]]
            if until in names or time.monotonic() > deadline:
                return names
            time.sleep(0.5)
