"""Tiny random Hugging Face models, one per task, built offline for tests and benchmarks.

Each builder writes a model plus its tokenizer or processor with `save_pretrained`, so
`transformers.pipeline(task, model=str(folder))` loads it with HF_HUB_OFFLINE=1 and nothing is
downloaded. The weights are random but seeded, so a build is reproducible. A few weight groups
are scaled up after init so that different inputs give visibly different answers: a parity test
between the batching queue and a plain pipeline() call proves nothing if every input yields the
same label and score.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import torch
import yaml
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    LayoutLMConfig,
    LayoutLMForQuestionAnswering,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from pipeq.cli.tiny_weights import (
    DIGITS,
    LETTERS,
    PUNCTUATION,
    SEED,
    WORDS,
    amplify_attention,
    standardize_head,
)
from pipeq.cli.tiny_whisper import build_speech_recognizer

# Written last, so a folder without it is a build that died half way and is built again.
BUILT_MARKER = ".tiny-model-built"

TINY_MODEL_TASKS: dict[str, str] = {
    "tiny-sentiment": "text-classification",
    "tiny-features": "feature-extraction",
    "tiny-zeroshot": "zero-shot-classification",
    "tiny-vit": "image-classification",
    "tiny-whisper": "automatic-speech-recognition",
    "tiny-docqa": "document-question-answering",
}


class _BertSize(TypedDict):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int


_BERT_SIZE = _BertSize(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
)


def _sample_sentences(count: int) -> list[str]:
    rng = random.Random(SEED)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 14))) for _ in range(count)]


def _labels(names: list[str]) -> dict[str, Any]:
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def _wordpiece_tokenizer() -> BertTokenizer:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PUNCTUATION, *DIGITS, *LETTERS]
    pieces += [f"##{char}" for char in LETTERS + DIGITS]
    pieces += [word for word in dict.fromkeys(WORDS) if len(word) > 1]
    # model_max_length bounds the document QA pipeline's windows to the 512 positions.
    return BertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, model_max_length=512)


def _build_bert_classifier(folder: Path, labels: list[str], pair_calibration: bool) -> None:
    torch.manual_seed(SEED)
    tokenizer = _wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **_BERT_SIZE,
        **_labels(labels),
    )
    model = BertForSequenceClassification(config).eval()
    amplify_attention(model)
    sentences = _sample_sentences(128)
    # Zero-shot scores premise/hypothesis pairs, so its head is calibrated on pairs.
    second = sentences[64:] if pair_calibration else None
    calibration = tokenizer(sentences[:64], second, padding=True, return_tensors="pt")
    standardize_head(model, model.classifier, calibration)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_text_classifier(folder: Path) -> None:
    _build_bert_classifier(folder, ["NEGATIVE", "NEUTRAL", "POSITIVE"], pair_calibration=False)


def build_zero_shot_classifier(folder: Path) -> None:
    # The zero-shot pipeline finds the entailment logit by a label whose name starts with "entail".
    labels = ["contradiction", "neutral", "entailment"]
    _build_bert_classifier(folder, labels, pair_calibration=True)


def build_feature_extractor(folder: Path) -> None:
    torch.manual_seed(SEED)
    tokenizer = _wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **_BERT_SIZE
    )
    model = BertModel(config)
    amplify_attention(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_image_classifier(folder: Path) -> None:
    torch.manual_seed(SEED)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **_labels(["cat", "dog", "bird", "fish", "horse"]),
    )
    model = ViTForImageClassification(config).eval()
    amplify_attention(model)
    # Pixels as the processor leaves them: normalized to [-1, 1].
    standardize_head(model, model.classifier, {"pixel_values": torch.rand(64, 3, 32, 32) * 2 - 1})
    model.save_pretrained(folder)
    # The PIL flavour: the torchvision one warns and falls back when torchvision is absent. Both
    # save as "ViTImageProcessor", so the loader still picks torchvision where it is installed.
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


def _random_boxes(shape: torch.Size) -> torch.Tensor:
    # LayoutLM embeds widths and heights too, so x1 >= x0 and y1 >= y0 on the 0-1000 grid.
    corner = torch.randint(0, 500, (*shape, 2))
    return torch.cat([corner, corner + torch.randint(0, 500, (*shape, 2))], dim=-1)


def build_document_qa(folder: Path) -> None:
    torch.manual_seed(SEED)
    tokenizer = _wordpiece_tokenizer()
    config = LayoutLMConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_2d_position_embeddings=1024,
        **_BERT_SIZE,
    )
    model = LayoutLMForQuestionAnswering(config).eval()
    amplify_attention(model)
    sentences = _sample_sentences(64)
    # Question, then the document's words, as the pipeline pairs them.
    calibration = tokenizer(sentences[:32], sentences[32:], padding=True, return_tensors="pt")
    calibration["bbox"] = _random_boxes(calibration["input_ids"].shape)
    standardize_head(model, model.qa_outputs, calibration)
    model.save_pretrained(folder)
    # No image processor: with word_boxes given the pipeline needs neither pixels nor OCR.
    tokenizer.save_pretrained(folder)


TASK_BUILDERS: dict[str, Callable[[Path], None]] = {
    "text-classification": build_text_classifier,
    "feature-extraction": build_feature_extractor,
    "zero-shot-classification": build_zero_shot_classifier,
    "image-classification": build_image_classifier,
    "automatic-speech-recognition": build_speech_recognizer,
    "document-question-answering": build_document_qa,
}


def _is_built(folder: Path) -> bool:
    return (folder / BUILT_MARKER).exists()


def _build_once(folder: Path, builder: Callable[[Path], None]) -> None:
    if _is_built(folder):
        return
    # Built beside the target and renamed into place, so a folder with the marker is always
    # complete, even with several processes building at once.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would hide the models from a worker run as another user
    try:
        builder(staging)
        (staging / BUILT_MARKER).touch()
        if not _is_built(folder):
            shutil.rmtree(folder, ignore_errors=True)  # left by a build that died half way
            staging.rename(folder)
    except OSError:
        # The rename fails when another process finished the same build first.
        if not _is_built(folder):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build one tiny model per task under root/<name>; skip ones already built; return
    {name: folder}."""
    root.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for name, task in TINY_MODEL_TASKS.items():
        folders[name] = (root / name).resolve()
        _build_once(folders[name], TASK_BUILDERS[task])
    return folders


def tiny_registry_yaml(paths: dict[str, Path]) -> str:
    """models.yaml text registering the models that build_tiny_models returned, on the CPU."""
    entries = {
        name: {
            "task": TINY_MODEL_TASKS[name],
            "model": str(Path(path).resolve()),
            "device": "cpu",
            "max_batch_size": 16,
            "max_wait_ms": 5,
        }
        for name, path in paths.items()
    }
    text: str = yaml.safe_dump({"models": entries}, sort_keys=False)
    return text
