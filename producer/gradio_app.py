"""`pipeq gradio MODEL`: a Gradio page over the queue, one per registered model.

The page's process loads no model: each press submits a job through `Client` and polls its
record, so the work runs on the GPU workers, and several users' jobs at once are batched there
like any others. Uploaded media travels inline (base64), within PIPEQ_MAX_MEDIA_BYTES.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

# Read by gradio at import time; without it every Blocks starts a thread that asks PyPI for
# gradio's latest version and launch() posts analytics.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from pipeq.config.errors import PipeqError, UnknownModel  # noqa: E402
from pipeq.core.jobs import JobDocument  # noqa: E402
from pipeq.producer.client import Client  # noqa: E402
from pipeq.producer.gradio_views import VIEWS, TaskView

STATUS_POLL_S = 0.25
JOB_TIMEOUT_S = 120.0


def status_line(doc: JobDocument) -> str:
    line = f"job {doc.id}: {doc.status}"
    if doc.worker:
        line += f" on {doc.worker}"
    errors = [error.message for error in doc.errors or [] if error is not None]
    return line + (f": {errors[0]}" if errors else "")


def job_runner(
    client: Client, model: str, view: TaskView, timeout_s: float, output_count: int
) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """The click handler: submit, yield the job's status while it waits, then its result."""

    def run(*values: Any) -> Iterator[tuple[Any, ...]]:
        inputs, params = view.to_job(*values)
        try:
            job_id = client.submit(model, inputs, params)
        except PipeqError as exc:
            raise gr.Error(f"{type(exc).__name__}: {exc}") from exc
        unchanged = (gr.skip(),) * output_count
        deadline = time.monotonic() + timeout_s
        doc = client.get(job_id)
        while not doc.done and time.monotonic() < deadline:
            yield (status_line(doc), *unchanged)
            doc = client.wait(job_id, STATUS_POLL_S)
        if doc.status != "succeeded" or not doc.outputs:
            waited = "" if doc.done else f" (still waiting after {timeout_s:.0f} s)"
            yield (status_line(doc) + waited, *unchanged)
            return
        yield (status_line(doc), *view.render(doc.outputs[0]))

    return run


def api_key_auth(api_keys: list[str]) -> Callable[[str, str], bool] | None:
    """Gradio's `auth` for a service with PIPEQ_API_KEYS: any user name, an API key as password.

    The page submits through `Client`, straight to the queue, not through the API that checks
    keys; without this a page on a keyed service would run anyone's jobs."""
    if not api_keys:
        return None
    digests = [hashlib.sha256(key.encode()).digest() for key in api_keys]

    def check(_user: str, password: str) -> bool:
        given = hashlib.sha256(password.encode()).digest()
        # Every key is compared, so the time taken does not say which one matched.
        return sum(hmac.compare_digest(given, digest) for digest in digests) > 0

    return check


def launch_page(client: Client, model: str, host: str, port: int, **launch: Any) -> gr.Blocks:
    """Serve `model`'s page on host:port, behind `api_key_auth` when the service has keys."""
    app = build_app(client, model)
    auth = api_key_auth(list(client.settings.api_key_secrets))
    app.launch(server_name=host, server_port=port, auth=auth, **launch)
    return app


def build_app(client: Client, model: str, timeout_s: float = JOB_TIMEOUT_S) -> gr.Blocks:
    """A page for `model` whose components fit its task, running each request as a job."""
    spec = client.registry.get(model)
    if spec is None:
        raise UnknownModel(
            f"unknown model {model!r}; this service has {', '.join(client.registry.models)}"
        )
    view = VIEWS[spec.task]
    app = gr.Blocks(title=f"pipeq: {model}", analytics_enabled=False)
    with app:
        gr.Markdown(f"## {model}\n{spec.task}, run on pipeq's workers")
        with gr.Row():
            with gr.Column():
                inputs = view.inputs()
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column():
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                outputs = view.outputs()
        # No concurrency limit: each handler mostly sleeps on the job's record, and jobs
        # submitted together are what the workers batch.
        submit.click(
            job_runner(client, model, view, timeout_s, len(outputs)),
            inputs=inputs,
            outputs=[status, *outputs],
            concurrency_limit=None,
        )
    return app
