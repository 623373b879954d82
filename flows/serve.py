"""Serve the dirimage flows as Prefect deployments from one long-running process.

`dirimage serve` registers one deployment per flow with the Prefect server named
by PREFECT_API_URL, then polls it for runs (scheduled ones, and those started
from the UI, the REST API or `run_deployment`) and executes each in a child
process. One flow may carry a schedule and default parameters; the others are
served without, to be started by hand with their parameters.

SIGTERM or Ctrl-C stops the process: Prefect pauses the schedules it served,
cancels runs still in flight, and returns.
"""

import importlib
import json
from datetime import timedelta

from prefect import Flow, serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType
from prefect.utilities.callables import ParameterSchema
from prefect.utilities.schema_tools.validation import validate

# Flow name to (module, function). Flows whose module is not part of this
# checkout are left out, so the list can name flows still being written.
SERVABLE_FLOWS = {
    "copy-image": ("flows.copy", "copy_image"),
    "verify-image": ("flows.copy", "verify_image"),
    "sync-images": ("flows.sync", "sync_images"),
    "verify-images": ("flows.sync", "verify_images"),
    "delete-image": ("flows.delete", "delete_image"),
}
DEFAULT_DEPLOYMENT_NAME = "serve"
DEFAULT_SCHEDULED_FLOW = "copy-image"


class ServeConfigError(ValueError):
    """The deployments cannot be served as asked; the message says why."""


class ClosedParameterSchema(ParameterSchema):
    """A flow's parameter schema that also refuses names the flow does not take.

    Prefect builds the schema from the flow's signature and leaves out
    `additionalProperties`, so the server accepts a misspelled optional
    parameter and the run crashes when it starts; with it set to false, the
    server refuses the run before creating it.
    """

    additionalProperties: bool = False


def closed_schema(schema: ParameterSchema) -> ClosedParameterSchema:
    """`schema` with unknown parameter names refused."""
    # Set explicitly: deployments send the schema with `exclude_unset=True`.
    return ClosedParameterSchema(
        **schema.model_dump(exclude_unset=True), additionalProperties=False
    )


def parse_param(text: str) -> tuple[str, object]:
    """Split `KEY=VALUE`; VALUE is read as JSON when it is JSON, else as text.

    So `parallel=4` gives 4, `remove_signatures=true` gives True, and
    `source=/srv/images/app` stays a string.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ServeConfigError(f"a parameter must look like KEY=VALUE, found {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def available_flows() -> dict[str, Flow]:
    """Flow name to flow, for every flow in SERVABLE_FLOWS this checkout has."""
    found = {}
    for name, (module_name, function) in SERVABLE_FLOWS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        found[name] = getattr(module, function)
    return found


def summary(flow: Flow) -> str:
    """The flow's docstring without its Args section: the UI shows those per field."""
    text = flow.description or ""
    return text.split("\n\nArgs:")[0].split("\n\nRaises:")[0].strip()


def check_parameters(flow: Flow, parameters: dict, scheduled: bool) -> None:
    """Refuse parameters the flow does not take or whose values break its schema.

    A scheduled deployment starts runs with no one to fill in the form, so then
    every required parameter needs a default here.
    """
    schema = flow.parameters.model_dump_for_openapi()
    unknown = sorted(set(parameters) - set(schema["properties"]))
    if unknown:
        raise ServeConfigError(
            f"{flow.name} takes no parameter {', '.join(unknown)}; it takes "
            f"{', '.join(schema['properties'])}"
        )
    errors = validate(parameters, schema, ignore_required=True)
    if errors:
        first = errors[0]
        field = first.json_path.replace("$.", "")
        raise ServeConfigError(f"parameter {field} of {flow.name}: {first.message}")
    missing = [key for key in schema.get("required", []) if key not in parameters]
    if scheduled and missing:
        raise ServeConfigError(
            f"a schedule for {flow.name} needs defaults for "
            + ", ".join(f"--param {key}=..." for key in missing)
        )


def check_cron(cron: str) -> None:
    """Refuse a cron expression the server would not accept."""
    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ServeConfigError(
            f"--cron {cron!r} is not a valid cron expression (minute hour day "
            "month weekday, each in range, for example '0 3 * * *')"
        ) from None


def build_deployments(
    name: str = DEFAULT_DEPLOYMENT_NAME,
    scheduled_flow: str = DEFAULT_SCHEDULED_FLOW,
    cron: str | None = None,
    interval: float | None = None,
    parameters: dict | None = None,
) -> list[RunnerDeployment]:
    """One deployment per available flow, all named `name`.

    The flow named `scheduled_flow` gets the schedule (`cron` or `interval`
    seconds, not both) and the default `parameters`; the others get neither.
    Every deployment makes the server check parameters against the flow's
    signature before a run is created, unknown names included.
    """
    flows = available_flows()
    if scheduled_flow not in flows:
        raise ServeConfigError(
            f"no flow named {scheduled_flow}; this checkout has {', '.join(flows)}"
        )
    if cron and interval:
        raise ServeConfigError("give --cron or --interval, not both")
    if interval is not None and interval <= 0:
        raise ServeConfigError(f"--interval must be positive, found {interval}")
    if cron:
        check_cron(cron)
    parameters = parameters or {}
    scheduled = bool(cron or interval)
    check_parameters(flows[scheduled_flow], parameters, scheduled)

    deployments = []
    for flow_name, flow in flows.items():
        options = {}
        if flow_name == scheduled_flow:
            options["parameters"] = parameters
            if cron:
                options["cron"] = cron
            if interval:
                options["interval"] = timedelta(seconds=interval)
        try:
            deployment = flow.to_deployment(
                name=name,
                description=summary(flow),
                tags=["dirimage"],
                enforce_parameter_schema=True,
                # Loaded by module name, not as a script under a made-up module
                # name, the flow's tasks can be pickled to Dask workers, which
                # import the same installed module.
                entrypoint_type=EntrypointType.MODULE_PATH,
                **options,
            )
        except ValueError as error:
            raise ServeConfigError(f"{flow_name}: {error}") from error
        # Prefect offers no argument for this; `prefect deploy` sets the same
        # attribute to install the schema it built.
        deployment._parameter_openapi_schema = closed_schema(
            deployment._parameter_openapi_schema
        )
        deployments.append(deployment)
    return deployments


def serve_flows(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Serve `deployments` until SIGTERM or Ctrl-C; needs a running server.

    Raises:
        ServeConfigError: PREFECT_API_URL is not set.
    """
    if not PREFECT_API_URL.value():
        raise ServeConfigError(
            "serving needs a running Prefect server: start one with "
            "`prefect server start` and set PREFECT_API_URL "
            "(for example http://127.0.0.1:4200/api)"
        )
    serve(*deployments, limit=limit)
