"""The body of `POST /v1/jobs` in the OpenAPI document: one variant per model of the registry,
with the inputs its task takes (core/input_kinds.py) and the params it accepts
(config/params.py). A body that follows the document is then one the API accepts, not one it
refuses with a 422 that the generic `JobRequest` schema gave no hint of."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pipeq.config.params import MAX_LABEL_CHARS, MAX_LABELS, PARAMS_BY_TASK
from pipeq.config.registry import ModelSpec

_REF = "#/components/schemas/{model}"
_MEDIA = {
    "oneOf": [
        {"$ref": _REF.format(model=name)} for name in ("UrlRef", "S3Ref", "PathRef", "DataRef")
    ]
}
# config/params.py: exactly one `{}`, no other brace (the library formats it with each label).
_TEMPLATE_PATTERN = r"^[^{}]*\{\}[^{}]*$"
# One input of each modality, for the example body of each model (Swagger UI's "Try it out").
_EXAMPLE_INPUTS: dict[str, Any] = {
    "text": "a fine day",
    "image": {"url": "https://example.com/cat.jpg"},
    "audio": {"url": "https://example.com/hello.flac"},
    "document": {"image": {"url": "https://example.com/invoice.png"}, "question": "Total?"},
}
# config/params.py's labels as one string: split at commas, each stripped (of what Python's
# str.strip() takes for white space, spelled out, as ECMA's \s differs), blanks dropped, 1 to
# MAX_LABELS labels of at most MAX_LABEL_CHARS.
_SPACES = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE, _INK = f"[{_SPACES}]", f"[^,{_SPACES}]"
_LABEL = f"{_SPACE}*{_INK}(?:[^,]{{0,{MAX_LABEL_CHARS - 2}}}{_INK})?{_SPACE}*"
LABELS_PATTERN = (
    f"^(?:{_SPACE}*,)*{_LABEL}(?:(?:,{_SPACE}*)*,{_LABEL}){{0,{MAX_LABELS - 1}}}(?:,{_SPACE}*)*$"
)


def add_job_variants(
    openapi: dict[str, Any], models: Mapping[str, ModelSpec], max_text_chars: int
) -> None:
    """Replace the request body of `POST /v1/jobs` in `openapi` with one variant per model."""
    if not models:
        return
    components: dict[str, Any] = openapi["components"]["schemas"]
    variants = [_variant(components, name, spec, max_text_chars) for name, spec in models.items()]
    body = openapi["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = {"oneOf": variants}


def _variant(
    components: dict[str, Any], name: str, spec: ModelSpec, max_text_chars: int
) -> dict[str, Any]:
    variant: dict[str, Any] = copy.deepcopy(components["JobRequest"])
    variant["title"] = f"JobRequest for {name} ({spec.task})"
    properties = variant["properties"]
    properties["model"] = {"const": name, "title": "Model"}
    properties["inputs"]["items"] = _input(spec.modality, max_text_chars)
    properties["params"] = _params(components, spec)
    example: dict[str, Any] = {"model": name, "inputs": [_EXAMPLE_INPUTS[spec.modality]]}
    # Zero-shot's candidate_labels, where the model gives none: an absent `params` is {}.
    if "required" in properties["params"]:
        variant["required"] = [*variant["required"], "params"]
        example["params"] = {"candidate_labels": ["praise", "complaint"]}
    variant["examples"] = [example]
    return variant


def _input(modality: str, max_text_chars: int) -> dict[str, Any]:
    if modality == "text":
        return {"type": "string", "maxLength": max_text_chars}
    if modality == "document":
        return {"$ref": _REF.format(model="DocumentInput")}
    return copy.deepcopy(_MEDIA)


def _params(components: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    schema = PARAMS_BY_TASK[spec.task].model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    properties: dict[str, Any] = schema["properties"]
    template = properties.get("hypothesis_template")
    if template is not None:
        for option in template["anyOf"]:
            if option.get("type") == "string":
                option["pattern"] = _TEMPLATE_PATTERN
    if "candidate_labels" in properties:
        _labels(schema, properties["candidate_labels"], spec)
    return schema


def _labels(schema: dict[str, Any], labels: dict[str, Any], spec: ModelSpec) -> None:
    for option in labels["anyOf"]:
        if option.get("type") == "string":
            option["pattern"] = LABELS_PATTERN
            option["description"] = (
                f"1 to {MAX_LABELS} comma-separated labels of at most {MAX_LABEL_CHARS} characters"
            )
    # Zero-shot needs candidate_labels, from the job or from the model's own params.
    if "candidate_labels" not in spec.params:
        labels["anyOf"] = [o for o in labels["anyOf"] if o.get("type") != "null"]
        labels.pop("default", None)
        schema["required"] = ["candidate_labels"]
