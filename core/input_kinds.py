"""Which inputs each modality's models take: what the submit checks before it queues a job."""

from __future__ import annotations

from pipeq.core.inputs import MEDIA_REFS, Input, input_kind

# What each modality's pipelines take (worker/media.py refuses anything else).
_ACCEPTED = {
    "text": ({"text"}, "a string"),
    "image": ({"url", "s3", "path", "data"}, MEDIA_REFS),
    "audio": ({"url", "s3", "path", "data"}, MEDIA_REFS),
    "document": ({"image"}, "a document: {'image': MEDIA, 'question': str}"),
}


def kind_error(item: Input, model: str, task: str, modality: str) -> str | None:
    """Why `item` cannot go to a model of `modality`, or None if it can."""
    kind = input_kind(item)
    accepted, described = _ACCEPTED[modality]
    if kind in accepted:
        return None
    given = {"text": "text", "image": "a document"}.get(kind or "", "a media reference")
    return f"is {given}; {model} ({task}) takes {described}"
