"""What the Gradio page shows for each task: its input components, how they become a job, and how
the job's output is displayed."""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr  # noqa: E402


@dataclass(frozen=True)
class TaskView:
    """The components of one task's page and the conversions between them and a job."""

    inputs: Callable[[], list[Any]]
    to_job: Callable[..., tuple[list[Any], dict[str, Any]]]
    outputs: Callable[[], list[Any]]
    render: Callable[[Any], tuple[Any, ...]]


def inline_media(path: str | None, what: str) -> dict[str, str]:
    """An uploaded file as an inline `{"data", "mime"}` input."""
    if not path:
        raise gr.Error(f"add {what} first")
    mime, _ = mimetypes.guess_type(path)
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"data": data, "mime": mime or "application/octet-stream"}


def _as_list(output: Any) -> list[dict[str, Any]]:
    # pipeline() answers one dict or a list of them, depending on top_k.
    return [output] if isinstance(output, dict) else list(output)


def _scores(output: Any) -> dict[str, float]:
    return {item["label"]: item["score"] for item in _as_list(output)}


def _text_job(text: str) -> tuple[list[Any], dict[str, Any]]:
    if not text.strip():
        raise gr.Error("enter some text first")
    return [text], {}


def _zero_shot_job(text: str, labels: str) -> tuple[list[Any], dict[str, Any]]:
    candidates = [label.strip() for label in labels.split(",") if label.strip()]
    if not candidates:
        raise gr.Error("give at least one candidate label")
    return _text_job(text)[0], {"candidate_labels": candidates}


def _transcript(output: dict[str, Any]) -> tuple[Any, ...]:
    chunks = [[*chunk["timestamp"], chunk["text"]] for chunk in output.get("chunks", [])]
    return output["text"], chunks


def _answer(output: Any) -> tuple[Any, ...]:
    answers = _as_list(output)
    return (answers[0]["answer"] if answers else ""), {a["answer"]: a["score"] for a in answers}


def _text_input() -> list[Any]:
    return [gr.Textbox(label="Text", lines=3, elem_id="text")]


def _label_output() -> list[Any]:
    return [gr.Label(label="Labels", elem_id="labels")]


VIEWS: dict[str, TaskView] = {
    "text-classification": TaskView(_text_input, _text_job, _label_output, lambda o: (_scores(o),)),
    "image-classification": TaskView(
        lambda: [gr.Image(type="filepath", label="Image", elem_id="image")],
        lambda path: ([inline_media(path, "an image")], {}),
        _label_output,
        lambda o: (_scores(o),),
    ),
    "zero-shot-classification": TaskView(
        lambda: [
            *_text_input(),
            gr.Textbox(label="Candidate labels (comma-separated)", elem_id="candidate_labels"),
        ],
        _zero_shot_job,
        _label_output,
        lambda o: (dict(zip(o["labels"], o["scores"], strict=True)),),
    ),
    "automatic-speech-recognition": TaskView(
        lambda: [
            gr.Audio(
                sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio"
            )
        ],
        lambda path: ([inline_media(path, "a recording")], {"return_timestamps": True}),
        lambda: [
            gr.Textbox(label="Transcript", elem_id="transcript"),
            gr.Dataframe(
                headers=["start s", "end s", "text"], label="Timestamps", elem_id="timestamps"
            ),
        ],
        _transcript,
    ),
    "document-question-answering": TaskView(
        lambda: [
            gr.Image(type="filepath", label="Document", elem_id="image"),
            gr.Textbox(label="Question", elem_id="question"),
        ],
        lambda path, question: (
            [{"image": inline_media(path, "a document image"), "question": question}],
            {},
        ),
        lambda: [
            gr.Textbox(label="Answer", elem_id="answer"),
            gr.Label(label="Answers", elem_id="answers"),
        ],
        _answer,
    ),
    "feature-extraction": TaskView(
        _text_input, _text_job, lambda: [gr.JSON(label="Output", elem_id="json")], lambda o: (o,)
    ),
}
