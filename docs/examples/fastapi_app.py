"""A FastAPI backend that uses pipeq through its HTTP API (the broker stays private).

    PIPEQ_API_URL=http://pipeq-api:8000 PIPEQ_API_KEY=... PIPEQ_WEBHOOK_SECRET=whsec_... \\
        uvicorn fastapi_app:app

`POST /reviews/score` waits for the answer (short jobs, a user waiting); `POST /reviews/batch`
answers 202 at once and takes the result on `POST /pipeq-webhook` when pipeq calls back.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from pipeq.config.errors import InvalidSignature, PipeqError
from pipeq.core.webhooks import verify
from pipeq.producer.async_http_client import AsyncHttpClient

MODEL = os.environ.get("REVIEWS_MODEL", "sentiment")
app = FastAPI()
pipeq = AsyncHttpClient(os.environ["PIPEQ_API_URL"], os.environ.get("PIPEQ_API_KEY"))
finished: dict[str, Any] = {}  # your database, in a real backend


@app.post("/reviews/score")
async def score(review: dict[str, str]) -> dict[str, Any]:
    try:
        job_id = await pipeq.submit(MODEL, [review["text"]])
        doc = await pipeq.wait(job_id, timeout_s=10)  # awaits; the event loop serves others
    except PipeqError as exc:
        raise HTTPException(502, f"{type(exc).__name__}: {exc}") from exc
    if doc.status != "succeeded":
        raise HTTPException(504 if not doc.done else 502, f"job {doc.id} is {doc.status}")
    return {"job": doc.id, "labels": doc.outputs[0]}


@app.post("/reviews/batch", status_code=202)
async def batch(reviews: dict[str, list[str]], request: Request) -> dict[str, str]:
    hook = str(request.url_for("pipeq_webhook"))
    job_id = await pipeq.submit(
        MODEL, reviews["texts"], priority="bulk", webhook={"url": hook, "events": ["succeeded"]}
    )
    return {"job": job_id}


@app.post("/pipeq-webhook", name="pipeq_webhook")
async def pipeq_webhook(request: Request) -> dict[str, str]:
    try:
        event = verify(await request.body(), request.headers, os.environ["PIPEQ_WEBHOOK_SECRET"])
    except InvalidSignature as exc:
        raise HTTPException(401, str(exc)) from exc
    finished[event["id"]] = event  # deliveries are at least once: keyed by job id, it dedupes
    return {"status": "ok"}
