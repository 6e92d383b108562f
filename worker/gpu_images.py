"""Image classification with decoding and preprocessing on the GPU (`gpu_preprocess: true`).

Measured on an H100 (shared/research/gpu-stages.md): the CPU path (PIL decode + the image
processor) gives ~330 img/s per core, far below a ViT-B/16 forward at ~9,900 img/s, while nvjpeg
decode (~12,000 img/s) and the fast image processor on the GPU (~57,000 img/s) outpace it. So the
prefetch stage only reads bytes (and checks the header), and the batcher's forward decodes the
whole batch with `torchvision.io.decode_jpeg(device="cuda")`, runs the pipeline's own (fast)
image processor on the GPU, then the model, and ranks each image's labels there: the front gets
the top k scores and labels of each image, not its logits (`ImageClassificationPostprocess`).

Answers differ slightly from the CPU path (another JPEG decoder and resize): within 0.006 of the
fp16 logits with the same top-1 on the research sample; bench/gpu.py measures the bound on every
run. Non-JPEG images are decoded on the CPU by torchvision and join the batch as pixels.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from transformers.pipelines.base import Pipeline

from pipeq.config.errors import ConfigError, DecodeError, MediaTooLarge
from pipeq.config.registry import ModelSpec
from pipeq.core.inputs import DataRef, PathRef, S3Ref, UrlRef
from pipeq.worker.adapters import ImageClassification
from pipeq.worker.jpeg_header import _header, _jpeg_size
from pipeq.worker.media import MediaLoader
from pipeq.worker.pipelines import CallParams, ModelInputs

_MEDIA_REFS = (UrlRef, S3Ref, PathRef, DataRef)


class GpuImagePipeline(ImageClassification):
    def __init__(self, spec: ModelSpec, pipe: Pipeline, **kwargs: Any) -> None:
        super().__init__(spec, pipe, **kwargs)
        if not _runs_on_gpu(pipe.image_processor):
            # A model saved with the PIL processor: that one pulls CUDA tensors back to the CPU and
            # resizes with PIL (~250 img/s). Its torchvision twin runs on the GPU.
            from transformers import AutoImageProcessor

            pipe.image_processor = AutoImageProcessor.from_pretrained(
                spec.model, revision=spec.revision, backend="torchvision"
            )
        if not _runs_on_gpu(pipe.image_processor):
            raise ConfigError(
                f"{spec.name}: gpu_preprocess needs the torchvision image processor; got "
                f"{type(pipe.image_processor).__name__} (is torchvision installed?)"
            )

    reads_inline = True

    def warm_input(self) -> tuple[Any, dict[str, Any]]:
        image, params = super().warm_input()
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        return buffer.getvalue(), params

    def load(self, item: Any, media: MediaLoader) -> Any:
        if not isinstance(item, _MEDIA_REFS):
            raise DecodeError("image models take a media reference (url, s3, path or data)")
        data = media.fetch(item)
        # Checked here, where the settings are, from the header alone; nothing decoded yet.
        width, height = _jpeg_size(data) or _header(data).size
        if width * height > media.settings.max_image_pixels:
            raise MediaTooLarge(
                f"image is {width}x{height} = {width * height} pixels, over the "
                f"{media.settings.max_image_pixels} pixel limit (PIPEQ_MAX_IMAGE_PIXELS)"
            )
        return data

    def preprocess(self, item: Any, call: CallParams) -> list[ModelInputs]:
        from torchvision.io import ImageReadMode, decode_image

        if _jpeg_size(item) is not None:
            return [{"jpeg": item}]
        header = _header(item)
        encoded = torch.frombuffer(bytearray(item), dtype=torch.uint8)
        try:
            return [
                {
                    "pixels": decode_image(
                        encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True
                    )
                }
            ]
        except RuntimeError as exc:
            raise DecodeError(f"cannot decode {header.format} image: {exc}") from exc

    def pack(self, parts: list[ModelInputs]) -> Any:
        """A block of JPEGs as one byte array and each one's length (one buffer on the wire, not
        one per image); decoded pixels as they are. A block holds one kind (`group_key`)."""
        if "jpeg" not in parts[0]:
            return parts
        lengths = np.array([len(part["jpeg"]) for part in parts], dtype=np.int64)
        joined = np.frombuffer(b"".join(part["jpeg"] for part in parts), dtype=np.uint8)
        return {"jpegs": joined, "lengths": lengths}

    def collate(self, packs: list[Any]) -> Any:
        parts: list[ModelInputs] = []
        for pack in packs:
            if not isinstance(pack, dict):
                parts += pack
                continue
            joined = torch.from_numpy(pack["jpegs"])
            ends = np.cumsum(pack["lengths"]).tolist()
            starts = [0, *ends[:-1]]
            parts += [{"jpeg": joined[start:end]} for start, end in zip(starts, ends, strict=True)]
        return parts

    def stage_batch(self, batch: Any) -> torch.Tensor:
        """A collated batch as the model's pixel values, on the GPU: JPEGs decoded there (by its
        JPEG engines), other images' pixels copied there, all through the (torchvision) image
        processor."""
        from torchvision.io import ImageReadMode, decode_jpeg

        parts: list[ModelInputs] = batch
        device = self.pipe.device
        jpeg_at = [i for i, part in enumerate(parts) if "jpeg" in part]
        images: list[torch.Tensor | None] = [None] * len(parts)
        if jpeg_at:
            decoded = decode_jpeg(
                [parts[i]["jpeg"] for i in jpeg_at],
                mode=ImageReadMode.RGB,
                device=device,
                apply_exif_orientation=True,
            )
            for i, image in zip(jpeg_at, decoded, strict=True):
                images[i] = image
        for i, part in enumerate(parts):
            if "pixels" in part:
                images[i] = part["pixels"].to(device, non_blocking=True)
        ready = [image for image in images if image is not None]
        assert len(ready) == len(parts)  # each part is a JPEG or pixels
        processor = self.pipe.image_processor
        assert processor is not None  # checked at __init__
        inputs = processor(images=ready, return_tensors="pt", device=device)
        pixel_values: torch.Tensor = inputs["pixel_values"].to(self.pipe.dtype)
        return pixel_values

    def forward_batch(self, batch: Any, call: CallParams) -> Any:
        """Each image's top k, copied to pinned host memory without waiting for the GPU (the
        forward process waits on an event before it sends them)."""
        with torch.inference_mode():
            ranked = self._postprocess.rank_batch(self.logits(batch), **call.postprocess)
            return {key: value.to("cpu", non_blocking=True) for key, value in ranked.items()}

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits: torch.Tensor = self.pipe.model(pixel_values=pixel_values).logits
            return logits

    def unbatch(
        self, output: Any, parts: list[ModelInputs], call: CallParams, batched: bool
    ) -> list[Any]:
        scores, labels = output["scores"], output["labels"]
        return [{"scores": scores[i], "labels": labels[i]} for i in range(len(parts))]

    def postprocess(self, outputs: list[Any], call: CallParams) -> Any:
        return self._postprocess.from_ranked(outputs[0])


def _runs_on_gpu(processor: Any) -> bool:
    """The torchvision-backed processors (`TorchvisionBackend`, formerly `...Fast`) take device=."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    return bool(names & {"TorchvisionBackend", "BaseImageProcessorFast"})
