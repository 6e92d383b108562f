"""The model registry: `models.yaml` parsed and validated, with errors that say how to fix it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeq.config.errors import ConfigError

Task = Literal[
    "text-classification",
    "zero-shot-classification",
    "feature-extraction",
    "image-classification",
    "automatic-speech-recognition",
    "document-question-answering",
]

# Which kind of media each task decodes its inputs into.
MODALITY: dict[str, str] = {
    "text-classification": "text",
    "zero-shot-classification": "text",
    "feature-extraction": "text",
    "image-classification": "image",
    "automatic-speech-recognition": "audio",
    "document-question-answering": "document",
}


class ModelSpec(BaseModel):
    """One entry of models.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    task: Task
    model: str = Field(description="Hub id, or a path (relative to models.yaml).")
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field(default="auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    device_map: Literal["auto"] | None = None
    max_memory: dict[str | int, str] | None = None
    pipeline_kwargs: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict, description="Default call params.")
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long the oldest item may wait for a fuller batch. 0: a batch starts as "
        "soon as the model is free, and the next one fills while it runs (best at low load).",
    )
    cache_ttl_s: int | None = Field(
        default=None,
        gt=0,
        description="Serve a repeated input (same content and params) from a result cache kept "
        "this long; off when unset.",
    )
    gpu_preprocess: bool = Field(
        default=False,
        description="Decode and preprocess images on the GPU: faster, answers within a small "
        "tolerance of the CPU path.",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_torch_dtype(cls, data: Any) -> Any:
        # The seed (and older transformers) spell it torch_dtype.
        if isinstance(data, dict) and "torch_dtype" in data:
            data = dict(data)
            if "dtype" in data:
                raise ValueError("give dtype or torch_dtype, not both")
            data["dtype"] = data.pop("torch_dtype")
        return data

    @model_validator(mode="after")
    def _placement_is_one_of(self) -> ModelSpec:
        if self.device_map and self.device not in ("auto", "cuda"):
            raise ValueError("device_map: auto places the model itself; drop `device`")
        return self

    @property
    def modality(self) -> str:
        return MODALITY[self.task]

    def public(self) -> dict[str, Any]:
        """What `GET /v1/models` and `pipeq models` show."""
        return self.model_dump(mode="json", exclude={"name", "pipeline_kwargs"})


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def select(self, names: list[str] | None) -> list[ModelSpec]:
        if not names:
            return list(self.models.values())
        unknown = sorted(set(names) - set(self.models))
        if unknown:
            raise ConfigError(
                f"unknown model(s) {', '.join(unknown)}; models.yaml has {', '.join(self.models)}"
            )
        return [self.models[name] for name in names]


def _resolve_model_path(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    model = entry.get("model")
    if isinstance(model, str) and model.startswith((".", "/", "~")):
        entry = dict(entry, model=str((base / Path(model).expanduser()).resolve()))
    return entry


def load_registry(path: Path) -> Registry:
    """Read and validate models.yaml; raise ConfigError naming the file and the bad field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read model registry {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict) or not raw["models"]:
        raise ConfigError(f"{path}: expected a mapping `models:` of name -> entry, got {raw!r}")
    entries = {
        name: _resolve_model_path({**(entry or {}), "name": name}, path.parent)
        for name, entry in raw["models"].items()
    }
    try:
        return Registry.model_validate({"models": entries})
    except ValidationError as exc:
        problems = "; ".join(
            f"models.{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
