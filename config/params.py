"""The call params a job may give, per task: names, types and ranges.

A pipeline's `_sanitize_parameters` hands names it does not know on to the tokenizer, to
`generate` or to Tesseract, so a job's params are checked against these models before any of
them reach a pipeline: at submit (`Client`, a 422 from the API) and again in the worker (a message
can be published by hand). OCR language and config (`lang`, `tesseract_config`) are in no list:
they are the operator's, from `params:` in models.yaml, which is not checked here.

Ranges bound what one small request can cost: `chunk_length_s` and the strides bound the chunks
per second of audio, `max_new_tokens` Whisper's decoder length, `doc_stride` and `max_seq_len`
the windows per document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from pipeq.config.errors import InvalidParams

MAX_LABELS = 100
MAX_LABEL_CHARS = 200
MAX_TEMPLATE_CHARS = 500

TopK = Annotated[int, Field(ge=1, le=1000)]
# The library's ClassificationFunction values (text and image classification share them).
ClassificationFunction = Literal["sigmoid", "softmax", "none"]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextClassificationParams(_Params):
    top_k: TopK | None = None  # null: every label, as pipeline(top_k=None)
    function_to_apply: ClassificationFunction | None = None
    truncation: bool | None = None


class ZeroShotParams(_Params):
    candidate_labels: (
        Annotated[str, Field(min_length=1, max_length=MAX_LABELS * (MAX_LABEL_CHARS + 1))]
        | Annotated[list[Label], Field(min_length=1, max_length=MAX_LABELS)]
        | None
    ) = None
    hypothesis_template: Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None
    multi_label: bool | None = None

    @model_validator(mode="after")
    def _labels_given_and_bounded(self, info: ValidationInfo) -> ZeroShotParams:
        labels = self.candidate_labels
        if labels is None and "candidate_labels" not in _defaults(info):
            raise ValueError("candidate_labels is required (a list of labels to score)")
        if isinstance(labels, str):
            parsed = [label.strip() for label in labels.split(",") if label.strip()]
            if not parsed or len(parsed) > MAX_LABELS:
                raise ValueError(f"candidate_labels: give 1 to {MAX_LABELS} comma-separated labels")
            if max(map(len, parsed)) > MAX_LABEL_CHARS:
                raise ValueError(f"candidate_labels: a label is over {MAX_LABEL_CHARS} characters")
        template = self.hypothesis_template
        # The library calls template.format(label): any other field ("{0:>99999999}") would be
        # a format spec of the caller's choosing.
        if template is not None and (
            template.count("{}") != 1
            or "{" in template.replace("{}", "")
            or "}" in template.replace("{}", "")
        ):
            raise ValueError("hypothesis_template must hold exactly one {} and no other braces")
        return self


class FeatureExtractionParams(_Params):
    truncation: bool | None = None
    # pipeq's own, on the library's answer: one vector per input (sentence-transformers, TEI).
    pooling: Literal["mean", "cls", "none"] | None = None
    normalize: bool | None = None


class ImageClassificationParams(_Params):
    top_k: TopK | None = None
    function_to_apply: ClassificationFunction | None = None


class GenerateKwargs(_Params):
    """The part of `generate`'s options a job may set (Whisper)."""

    max_new_tokens: Annotated[int, Field(ge=1, le=448)] | None = None  # Whisper's 448 positions
    num_beams: Annotated[int, Field(ge=1, le=5)] | None = None
    language: Annotated[str, Field(pattern=r"^[A-Za-z<|>_ -]{1,32}$")] | None = None
    task: Literal["transcribe", "translate"] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


Stride = Annotated[float, Field(ge=0.0, le=10.0)]


class SpeechRecognitionParams(_Params):
    chunk_length_s: Annotated[float, Field(ge=1.0, le=30.0)] | None = None
    stride_length_s: Stride | Annotated[list[Stride], Field(min_length=2, max_length=2)] | None = (
        None
    )
    return_timestamps: bool | Literal["word"] | None = None
    return_language: bool | None = None
    generate_kwargs: GenerateKwargs | None = None

    @model_validator(mode="after")
    def _chunks_advance(self, info: ValidationInfo) -> SpeechRecognitionParams:
        # Chunk i starts at i * (chunk - left - right): strides near half a chunk would make
        # thousands of chunks of a few seconds of audio. A third of a chunk each side at most.
        chunk = self.chunk_length_s or _defaults(info).get("chunk_length_s")
        stride = self.stride_length_s
        if chunk is None or stride is None or not isinstance(chunk, (int, float)):
            return self
        sides = stride if isinstance(stride, list) else [stride, stride]
        if max(sides) > chunk / 3:
            raise ValueError(
                f"stride_length_s: at most chunk_length_s / 3 ({chunk / 3:g} s) a side"
            )
        return self


class DocumentQuestionAnsweringParams(_Params):
    top_k: TopK | None = None
    max_answer_len: Annotated[int, Field(ge=1, le=512)] | None = None
    handle_impossible_answer: bool | None = None
    # A window advances by max_seq_len - question - doc_stride tokens: with these ranges a page
    # makes tens of windows, not thousands. (max_question_len is left out: the library takes it
    # and then fails every input with a TypeError.)
    max_seq_len: Annotated[int, Field(ge=256, le=512)] | None = None
    doc_stride: Annotated[int, Field(ge=0, le=128)] | None = None


PARAMS_BY_TASK: dict[str, type[_Params]] = {
    "text-classification": TextClassificationParams,
    "zero-shot-classification": ZeroShotParams,
    "feature-extraction": FeatureExtractionParams,
    "image-classification": ImageClassificationParams,
    "automatic-speech-recognition": SpeechRecognitionParams,
    "document-question-answering": DocumentQuestionAnsweringParams,
}


def check_params(task: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Raise InvalidParams naming the first bad param unless `params` fit the task's list.
    `defaults` are the model's own params (models.yaml), which may supply required ones."""
    model = PARAMS_BY_TASK[task]
    try:
        model.model_validate(params, context={"defaults": defaults})
    except ValidationError as exc:
        raise InvalidParams(_describe(task, model, exc)) from None


def _defaults(info: ValidationInfo) -> Mapping[str, Any]:
    context = info.context or {}
    defaults: Mapping[str, Any] = context.get("defaults", {})
    return defaults


def _describe(task: str, model: type[BaseModel], exc: ValidationError) -> str:
    """One line naming the param and what is accepted; never the values given."""
    errors = exc.errors(include_input=False, include_url=False, include_context=False)
    # A union reports one error per member; the one that is not a type mismatch says more.
    same = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
    error = next((e for e in same if not e["type"].endswith("_type")), errors[0])
    names: list[str] = []
    current: type[BaseModel] | None = model
    for part in error["loc"]:
        if current is None or part not in current.model_fields:
            break
        names.append(str(part))
        current = _sub_model(current, str(part))
    if error["type"] == "extra_forbidden":
        owner = _owner(model, names)
        unknown = str(error["loc"][len(names)])
        accepted = ", ".join(sorted(owner.model_fields)) or "none"
        where = f"params.{'.'.join([*names, unknown])}"
        return f"{where} is not accepted for {task}; accepted: {accepted}"
    where = "params" + "".join(f".{name}" for name in names)
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


def _sub_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    annotation = model.model_fields[field].annotation
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _owner(model: type[BaseModel], names: list[str]) -> type[BaseModel]:
    for name in names:
        model = _sub_model(model, name) or model
    return model
