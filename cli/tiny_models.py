"""Tiny random Hugging Face models, one per task, built offline for tests and benchmarks.

Each builder writes a model plus its tokenizer or processor with `save_pretrained`, so
`transformers.pipeline(task, model=str(folder))` loads it with HF_HUB_OFFLINE=1 and nothing is
downloaded. The weights are random but seeded, so a build is reproducible. A few weight groups
are scaled up after init so that different inputs give visibly different answers: a parity test
between the batching queue and a plain pipeline() call proves nothing if every input yields the
same label and score.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

import torch
import yaml
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    GenerationConfig,
    LayoutLMConfig,
    LayoutLMForQuestionAnswering,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

SEED = 0
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

# Common words get their own ids and anything else splits into letters, so English text
# tokenizes to varied ids rather than a run of [UNK].
_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go me
when make can like time no just him know take people into year your good some could them see other
than then now look only come its over think also back after use two how our work first well way
even new want because any these give day most us is are was were been has had did does said made
went got very much more many great best bad love hate terrible awful wonderful happy sad movie film
book price service food product store order delivery late early fast slow quality cheap expensive
refund broken works working recommend never always again buy bought money worth waste excellent
poor fine okay nice amazing horrible boring fun easy hard help thanks thank please sorry today
tomorrow yesterday week month invoice total amount date name address number account customer
company city street phone email paid due payment tax receipt box page document question answer
where why cat dog car house tree water sun moon red blue green black white small big old young
long short high low left right
""".split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_PUNCTUATION = ".,!?;:'\"-()/&$%#@"


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

_EOT = "<|endoftext|>"
# Whisper's tokenizer and generate() find these by offset from one another, so the order is the
# library's: start of transcript, the languages as LANGUAGES lists them, then the task and
# control tokens, with the timestamps right after <|notimestamps|>.
_WHISPER_SPECIALS = (
    "<|startoftranscript|>",
    *(f"<|{code}|>" for code in LANGUAGES),
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
)
# 0.00 s to 30.00 s in 0.02 s steps: one 30 s window of 1,500 encoder positions.
_WHISPER_TIMESTAMPS = tuple(f"<|{step * 0.02:.2f}|>" for step in range(1501))


def _scale(weights: list[torch.Tensor], factor: float) -> None:
    with torch.no_grad():
        for weight in weights:
            weight.mul_(factor)


def _standardize_head(
    model: nn.Module, head: nn.Linear, inputs: Mapping[str, torch.Tensor]
) -> None:
    """Rescale `head` so that each of its outputs has mean 0 and std 1 over `inputs`.

    At the default init the outputs sit at a fixed offset and barely move with the input: nine
    different sentences all got NEGATIVE, at scores within 0.004 of one another.
    """
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, args, _out: features.append(args[0]))
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        flat = features[0].reshape(-1, head.in_features)
        head.weight.div_((flat @ head.weight.T).std(dim=0).unsqueeze(1))
        head.bias.copy_(-(flat @ head.weight.T).mean(dim=0))


def _amplify_attention(model: nn.Module) -> None:
    # Random BERTs carry each token's own embedding almost unchanged along the residual path;
    # louder attention mixes in the rest of the text, so the [CLS] summary and each token's
    # answer logits depend on the whole input. It also keeps _standardize_head's gain, and with
    # it the float noise between batched and single calls, low: ~250 instead of ~20,000.
    suffixes = (
        "attention.self.value",
        "attention.output.dense",
        "attention.v_proj",  # ViT in transformers 5
        "attention.o_proj",
    )
    layers = [m for name, m in model.named_modules() if name.endswith(suffixes)]
    _scale([layer.weight for layer in layers], 10.0)


def _sample_sentences(count: int) -> list[str]:
    rng = random.Random(SEED)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(2, 14))) for _ in range(count)]


def _labels(names: list[str]) -> dict[str, Any]:
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def _wordpiece_tokenizer() -> BertTokenizer:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_PUNCTUATION, *_DIGITS, *_LETTERS]
    pieces += [f"##{char}" for char in _LETTERS + _DIGITS]
    pieces += [word for word in dict.fromkeys(_WORDS) if len(word) > 1]
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
    _amplify_attention(model)
    sentences = _sample_sentences(128)
    # Zero-shot scores premise/hypothesis pairs, so its head is calibrated on pairs.
    second = sentences[64:] if pair_calibration else None
    calibration = tokenizer(sentences[:64], second, padding=True, return_tensors="pt")
    _standardize_head(model, model.classifier, calibration)
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
    _amplify_attention(model)
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
    _amplify_attention(model)
    # Pixels as the processor leaves them: normalized to [-1, 1].
    _standardize_head(model, model.classifier, {"pixel_values": torch.rand(64, 3, 32, 32) * 2 - 1})
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
    _amplify_attention(model)
    sentences = _sample_sentences(64)
    # Question, then the document's words, as the pipeline pairs them.
    calibration = tokenizer(sentences[:32], sentences[32:], padding=True, return_tensors="pt")
    calibration["bbox"] = _random_boxes(calibration["input_ids"].shape)
    _standardize_head(model, model.qa_outputs, calibration)
    model.save_pretrained(folder)
    # No image processor: with word_boxes given the pipeline needs neither pixels nor OCR.
    tokenizer.save_pretrained(folder)


def _whisper_tokenizer() -> WhisperTokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Printable ASCII only ("Ġ" is byte-level's space), so a random decoder writes letters and
    # words rather than control bytes and broken UTF-8.
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=["Ġ", *map(chr, range(33, 127))], show_progress=False
    )
    bpe.train_from_iterator([" ".join(_WORDS)], trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = WhisperTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        # Without a pad token the pipeline cannot batch (batch_size > 1).
        pad_token=_EOT,
        model_max_length=448,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_WHISPER_SPECIALS)})
    # Not special: the tokenizer takes the id after the last special token as timestamp 0.00.
    timestamps = [AddedToken(t, special=False, normalized=False) for t in _WHISPER_TIMESTAMPS]
    tokenizer.add_tokens(timestamps)
    return tokenizer


def _whisper_generation_config(ids: dict[str, int]) -> GenerationConfig:
    eot = ids[_EOT]
    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={task: ids[f"<|{task}|>"] for task in ("translate", "transcribe")},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[ids["Ġ"], eot],
        suppress_tokens=[],
        # Word timestamps come from these (layer, head) cross-attentions: the last decoder layer.
        alignment_heads=[[1, 0], [1, 1]],
        # 20 tokens keep a call near 0.1 s; without num_beams the pipeline decodes with 5 beams.
        max_length=20,
        num_beams=1,
    )


def _make_whisper_listen(model: WhisperForConditionalGeneration, first_special_id: int) -> None:
    # At the default init the decoder emits mostly timestamps (empty text) whatever the audio.
    # These factors, found by trial, give non-empty text that differs between a noise clip, a
    # tone and a chirp: louder text logits, a louder encoder, sharper cross-attention.
    decoder = model.model.decoder
    _scale([model.proj_out.weight[:first_special_id]], 5.0)
    _scale([model.model.encoder.conv1.weight, model.model.encoder.conv2.weight], 5.0)
    _scale([layer.encoder_attn.q_proj.weight for layer in decoder.layers], 5.0)
    _scale([layer.encoder_attn.k_proj.weight for layer in decoder.layers], 5.0)


def build_speech_recognizer(folder: Path) -> None:
    torch.manual_seed(SEED)
    tokenizer = _whisper_tokenizer()
    ids = tokenizer.get_vocab()
    eot = ids[_EOT]
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        # 1,500 positions are one 30 s window, which chunking and the timestamp tokens assume.
        max_source_positions=1500,
        max_target_positions=448,
        # Untied, so scaling the text logits leaves the decoder's input embeddings alone.
        tie_word_embeddings=False,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        # The generation config holds the real ones; the defaults name ids of the full vocabulary.
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = _whisper_generation_config(ids)
    _make_whisper_listen(model, first_special_id=eot)
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)


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
