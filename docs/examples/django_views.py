"""Django views that use pipeq through its HTTP API: an async view that waits for the answer,
and a sync one that answers 202 and takes the result on a webhook.

    # settings.py
    PIPEQ_API_URL = "http://pipeq-api:8000"; PIPEQ_API_KEY = "..."; PIPEQ_WEBHOOK_SECRET = "whsec_..."
    # urls.py
    path("reviews/score", views.score), path("reviews/batch", views.batch),
    path("pipeq-webhook", views.pipeq_webhook, name="pipeq-webhook"),
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from pipeq.config.errors import InvalidSignature, PipeqError
from pipeq.core.webhooks import verify
from pipeq.producer.async_http_client import AsyncHttpClient
from pipeq.producer.http_client import HttpClient

finished: dict[str, Any] = {}  # your models, in a real project


def _model() -> str:
    return getattr(settings, "REVIEWS_MODEL", "sentiment")


@csrf_exempt
async def score(request: HttpRequest) -> JsonResponse:
    text = json.loads(request.body)["text"]
    async with AsyncHttpClient(settings.PIPEQ_API_URL, settings.PIPEQ_API_KEY) as pipeq:
        try:
            doc = await pipeq.wait(await pipeq.submit(_model(), [text]), timeout_s=10)
        except PipeqError as exc:
            return JsonResponse({"error": f"{type(exc).__name__}: {exc}"}, status=502)
    if doc.status != "succeeded":
        return JsonResponse({"error": f"job {doc.id} is {doc.status}"}, status=504)
    return JsonResponse({"job": doc.id, "labels": doc.outputs[0]})


@csrf_exempt
def batch(request: HttpRequest) -> JsonResponse:
    texts = json.loads(request.body)["texts"]
    hook = request.build_absolute_uri(reverse("pipeq-webhook"))
    with HttpClient(settings.PIPEQ_API_URL, settings.PIPEQ_API_KEY) as pipeq:
        job_id = pipeq.submit(
            _model(), texts, priority="bulk", webhook={"url": hook, "events": ["succeeded"]}
        )
    return JsonResponse({"job": job_id}, status=202)


@csrf_exempt
def pipeq_webhook(request: HttpRequest) -> HttpResponse:
    try:
        event = verify(request.body, request.headers, settings.PIPEQ_WEBHOOK_SECRET)
    except InvalidSignature:
        return HttpResponse(status=401)
    finished[event["id"]] = event  # deliveries are at least once: keyed by job id, it dedupes
    return HttpResponse(status=204)
