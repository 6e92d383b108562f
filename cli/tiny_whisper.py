"""A tiny random Whisper, built offline: its tokenizer, its generation config, and weights that
make it transcribe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from pipeq.cli.tiny_weights import (
    SEED,
    WORDS,
    scale,
)

EOT = "<|endoftext|>"


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


def whisper_tokenizer() -> WhisperTokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Printable ASCII only ("Ġ" is byte-level's space), so a random decoder writes letters and
    # words rather than control bytes and broken UTF-8.
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=["Ġ", *map(chr, range(33, 127))], show_progress=False
    )
    bpe.train_from_iterator([" ".join(WORDS)], trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = WhisperTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        # Without a pad token the pipeline cannot batch (batch_size > 1).
        pad_token=EOT,
        model_max_length=448,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_WHISPER_SPECIALS)})
    # Not special: the tokenizer takes the id after the last special token as timestamp 0.00.
    timestamps = [AddedToken(t, special=False, normalized=False) for t in _WHISPER_TIMESTAMPS]
    tokenizer.add_tokens(timestamps)
    return tokenizer


def whisper_generation_config(ids: dict[str, int]) -> GenerationConfig:
    eot = ids[EOT]
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
    scale([model.proj_out.weight[:first_special_id]], 5.0)
    scale([model.model.encoder.conv1.weight, model.model.encoder.conv2.weight], 5.0)
    scale([layer.encoder_attn.q_proj.weight for layer in decoder.layers], 5.0)
    scale([layer.encoder_attn.k_proj.weight for layer in decoder.layers], 5.0)


def whisper_config(ids: dict[str, int], **shape: Any) -> WhisperConfig:
    """A Whisper of `shape` (sizes, vocabulary) whose special ids are the offline tokenizer's."""
    eot = ids[EOT]
    return WhisperConfig(
        **shape,
        # 1,500 positions are one 30 s window, which chunking and the timestamp tokens assume.
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        # The generation config holds the real ones; the defaults name ids of the full vocabulary.
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )


def build_speech_recognizer(folder: Path) -> None:
    torch.manual_seed(SEED)
    tokenizer = whisper_tokenizer()
    ids = tokenizer.get_vocab()
    eot = ids[EOT]
    config = whisper_config(
        ids,
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        # Untied, so scaling the text logits leaves the decoder's input embeddings alone.
        tie_word_embeddings=False,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = whisper_generation_config(ids)
    _make_whisper_listen(model, first_special_id=eot)
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
