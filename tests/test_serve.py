"""The deployments `dirimage serve` builds, checked without a server."""

import pytest
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.utilities.schema_tools.validation import validate

from flows.serve import ServeConfigError, build_deployments

DEFAULTS = {"source": "/srv/images/app", "destination": "/backup/images/app"}


def by_flow(deployments) -> dict:
    return {deployment.flow_name: deployment for deployment in deployments}


def sent_schema(deployment) -> dict:
    """The parameter schema as the deployment sends it to the server."""
    return deployment._parameter_openapi_schema.model_dump(exclude_unset=True)


def test_cron_schedule_and_defaults_go_to_the_scheduled_flow_only():
    deployments = by_flow(
        build_deployments(name="nightly", cron="0 3 * * *", parameters=DEFAULTS)
    )

    copy = deployments.pop("copy-image")
    assert copy.name == "nightly"
    [schedule] = copy.schedules
    assert schedule.schedule == CronSchedule(cron="0 3 * * *")
    assert schedule.active
    assert copy.parameters == DEFAULTS
    assert deployments, "only copy-image was built"
    for flow_name, other in deployments.items():
        assert other.name == "nightly", flow_name
        assert not other.schedules, flow_name
        assert not other.parameters, flow_name


def test_interval_schedule_for_another_flow():
    deployments = by_flow(
        build_deployments(
            scheduled_flow="verify-image",
            interval=90,
            parameters={"path": "/backup/images/app"},
        )
    )

    [schedule] = deployments["verify-image"].schedules
    assert isinstance(schedule.schedule, IntervalSchedule)
    assert schedule.schedule.interval.total_seconds() == 90
    assert not deployments["copy-image"].schedules


@pytest.mark.parametrize(
    "cron", ["every day", "0 3 * *", "61 * * * *", "0 25 * * *", "0 3 * * funday"]
)
def test_bad_cron_is_refused(cron):
    with pytest.raises(ServeConfigError, match=r"--cron .* is not a valid cron"):
        build_deployments(cron=cron, parameters=DEFAULTS)


def test_cron_without_defaults_for_required_parameters_is_refused():
    with pytest.raises(ServeConfigError, match="--param source=.*--param destination"):
        build_deployments(cron="0 3 * * *")


def test_cron_and_interval_together_are_refused():
    with pytest.raises(ServeConfigError, match="not both"):
        build_deployments(cron="0 3 * * *", interval=60, parameters=DEFAULTS)


def test_every_schema_refuses_unknown_parameter_names():
    for deployment in build_deployments():
        schema = sent_schema(deployment)
        assert schema["additionalProperties"] is False, deployment.flow_name
        assert schema["properties"], deployment.flow_name


def test_misspelled_parameter_fails_the_servers_check():
    copy = by_flow(build_deployments())["copy-image"]
    schema = sent_schema(copy)
    misspelled = {**DEFAULTS, "paralel": 2}

    # The same check the server runs before it creates a run.
    assert validate(DEFAULTS, schema) == []
    [error] = validate(misspelled, schema)
    assert "'paralel' was unexpected" in error.message
