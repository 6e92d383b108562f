"""The tiny models load with plain pipeline() offline, answer in each task's shape, tell two
inputs apart, and are registered by models.yaml text that the registry accepts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw
from transformers import Pipeline, pipeline

from pipeq.cli.tiny_models import (
    BUILT_MARKER,
    TINY_MODEL_TASKS,
    build_tiny_models,
    tiny_registry_yaml,
)
from pipeq.config.registry import load_registry

RATE = 16_000
TEXTS = ["I love this movie, it was wonderful!", "the delivery was late and the box arrived broken"]
# Two warnings from transformers' own word timing (generation_whisper.py), harmless here: random
# weights place words anywhere, even past the clip, so it takes the std of an empty slice; and
# with a batch of chunks it calls np.repeat on a torch tensor.
WORD_TIMESTAMPS = pytest.param(
    "word",
    marks=[
        pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning"),
        pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
    ],
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def _pipe(tiny_models: dict[str, Path], name: str) -> Pipeline:
    return pipeline(TINY_MODEL_TASKS[name], model=str(tiny_models[name]), device="cpu")


def _clip(kind: str, seconds: float) -> dict[str, Any]:
    t = np.arange(int(RATE * seconds)) / RATE
    if kind == "noise":
        wave = 0.1 * np.random.default_rng(0).standard_normal(t.size)
    elif kind == "tone":
        wave = 0.5 * np.sin(2 * math.pi * 440 * t)
    else:
        wave = 0.5 * np.sin(2 * math.pi * (200 + 40 * (t % 10)) * t)
    return {"raw": wave.astype(np.float32), "sampling_rate": RATE}


def _assert_timed_chunks(result: dict[str, Any]) -> None:
    assert result["text"] and result["chunks"]
    for chunk in result["chunks"]:
        assert isinstance(chunk["text"], str)
        assert len(chunk["timestamp"]) == 2


def test_builds_every_task_once_and_reproducibly(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    first = build_tiny_models(tmp_path)
    assert set(first) == set(TINY_MODEL_TASKS)
    for name, path in first.items():
        weights = (path / "model.safetensors").read_bytes()
        assert weights == (tiny_models[name] / "model.safetensors").read_bytes(), name
    stamps = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in first.items()}

    again = build_tiny_models(tmp_path)

    assert again == first
    assert {
        name: (path / "model.safetensors").stat().st_mtime_ns for name, path in again.items()
    } == stamps
    assert all((path / BUILT_MARKER).exists() and path.is_absolute() for path in again.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(first)  # no staging left behind


def test_rebuilds_a_folder_left_half_built(tmp_path: Path) -> None:
    (tmp_path / "tiny-vit").mkdir()
    (tmp_path / "tiny-vit" / "config.json").write_text("{")

    folder = build_tiny_models(tmp_path)["tiny-vit"]

    assert (folder / BUILT_MARKER).exists()
    assert _pipe({"tiny-vit": folder}, "tiny-vit")(Image.new("RGB", (32, 32), "red"))


def test_registry_yaml_shape_and_validation(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    text = tiny_registry_yaml(tiny_models)

    assert yaml.safe_load(text)["models"]["tiny-sentiment"] == {
        "task": "text-classification",
        "model": str(tiny_models["tiny-sentiment"]),
        "device": "cpu",
        "max_batch_size": 16,
        "max_wait_ms": 5,
    }
    (tmp_path / "models.yaml").write_text(text)
    registry = load_registry(tmp_path / "models.yaml")
    assert {name: spec.task for name, spec in registry.models.items()} == TINY_MODEL_TASKS


def test_text_classification(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-sentiment")

    top = pipe(TEXTS)
    every = pipe(TEXTS, top_k=None)

    assert [sorted(r) for r in top] == [["label", "score"]] * 2
    assert {r["label"] for r in every[0]} == {"NEGATIVE", "NEUTRAL", "POSITIVE"}
    assert top[0] != top[1]
    assert {r["label"] for r in top} != {top[0]["label"]}  # different labels, not just scores


def test_zero_shot_classification(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-zeroshot")
    labels = ["billing", "shipping", "praise"]

    results = [pipe(text, candidate_labels=labels) for text in TEXTS]

    for text, result in zip(TEXTS, results, strict=True):
        assert result["sequence"] == text and sorted(result["labels"]) == sorted(labels)
        assert math.isclose(sum(result["scores"]), 1.0, rel_tol=1e-5)
    assert results[0]["scores"] != results[1]["scores"]


def test_feature_extraction_gives_one_vector_per_token(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-features")

    vectors = [np.asarray(pipe(text)) for text in TEXTS]

    # Nested lists [1][tokens][32]: tokens counts [CLS] and [SEP]; letters split unknown words.
    assert vectors[0].shape == (1, len(pipe.tokenizer(TEXTS[0])["input_ids"]), 32)
    assert vectors[0].shape != vectors[1].shape
    assert not np.allclose(vectors[0][0, 1], vectors[1][0, 1], atol=1e-2)
    assert "[UNK]" not in pipe.tokenizer.tokenize(TEXTS[1] + " zebra xylophone")


def test_image_classification(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-vit")
    circle = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(circle).ellipse((5, 5, 35, 35), fill="blue")

    results = [pipe(image) for image in (circle, Image.new("RGB", (64, 48), "red"))]

    for result in results:
        assert sorted(r["label"] for r in result) == ["bird", "cat", "dog", "fish", "horse"]
    assert results[0][0]["label"] != results[1][0]["label"]


def test_speech_recognition_plain(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-whisper")

    texts = [pipe(_clip(kind, 3))["text"] for kind in ("noise", "tone")]

    assert all(texts) and texts[0] != texts[1]
    assert pipe(_clip("noise", 3))["text"] == texts[0]


@pytest.mark.parametrize("timestamps", [True, WORD_TIMESTAMPS])
def test_speech_recognition_timestamps(
    tiny_models: dict[str, Path], timestamps: bool | str
) -> None:
    pipe = _pipe(tiny_models, "tiny-whisper")

    results = [pipe(_clip(kind, 3), return_timestamps=timestamps) for kind in ("noise", "tone")]

    for result in results:
        _assert_timed_chunks(result)
    assert results[0] != results[1]


@pytest.mark.parametrize("timestamps", [True, WORD_TIMESTAMPS])
def test_speech_recognition_chunks_long_audio(
    tiny_models: dict[str, Path], timestamps: bool | str
) -> None:
    pipe = _pipe(tiny_models, "tiny-whisper")
    kwargs = {"chunk_length_s": 30, "batch_size": 2, "return_timestamps": timestamps}

    results = [pipe(_clip(kind, 45), **kwargs) for kind in ("noise", "chirp")]

    for result in results:
        _assert_timed_chunks(result)
    assert results[0]["text"] != results[1]["text"]


def test_speech_recognition_language_and_task_in_a_batch(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-whisper")
    kinds = ("noise", "tone", "chirp")
    generate_kwargs = {"language": "en", "task": "transcribe"}

    # Fresh dicts each call: the pipeline pops "raw" and "sampling_rate" out of its input.
    batched = pipe(
        [_clip(kind, 3) for kind in kinds], batch_size=2, generate_kwargs=generate_kwargs
    )
    alone = [pipe(_clip(kind, 3), generate_kwargs=generate_kwargs) for kind in kinds]

    assert batched == alone
    assert all(r["text"] for r in batched) and len({r["text"] for r in batched}) == 3


def test_document_question_answering_with_word_boxes(tiny_models: dict[str, Path]) -> None:
    pipe = _pipe(tiny_models, "tiny-docqa")
    page = Image.new("RGB", (400, 200), "white")
    invoice = [
        ("Invoice", [10, 10, 100, 30]),
        ("number", [110, 10, 200, 30]),
        ("A-1234", [210, 10, 300, 30]),
    ]
    receipt = [
        ("Total", [10, 50, 80, 70]),
        ("due", [90, 50, 150, 70]),
        ("$99.00", [160, 50, 260, 70]),
    ]

    results = [
        pipe(image=page, question="What is the invoice number?", word_boxes=invoice),
        pipe(image=page, question="What is the total due?", word_boxes=receipt),
    ]

    for result, words in zip(results, (invoice, receipt), strict=True):
        assert len(result) == 1 and sorted(result[0]) == ["answer", "end", "score", "start"]
        assert 0 <= result[0]["start"] <= result[0]["end"] < len(words)
        assert result[0]["answer"] in " ".join(word for word, _ in words)
    assert results[0] != results[1]
