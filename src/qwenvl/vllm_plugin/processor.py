"""vLLM's multimodal processing for Qwen-VL: pictures to pixels, image spans to image features.

A picture's place in a prompt is an image span: `<img>`, 256 `<imgpad>`, `</img>` (258 ids, SPEC
2). The chat template writes one per picture (`Picture N: <img></img>`), and qwenvl's tokenizer
turns the text `<img></img>` into such a span too, so a text prompt names its pictures the same
way. The processor finds each span and marks its 256 pads as the places where the picture's
features go; the pixels are made as qwenvl makes them (448x448 bicubic, CLIP mean and std).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from ..images import preprocess
from ..tokenizer import IMAGE_SPAN

PIXELS = "pixel_values"
EMBEDDINGS = "image_embeds"


def image_placeholder(index: int) -> str:
    """The text a chat turn holds for its `index`-th picture (from 1), as `from_list_format` writes it."""
    return f"Picture {index}: <img></img>\n"


class QwenVLProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_hf_config().vision.n_queries}

    def image_span(self) -> list[int]:
        """The ids of an image span: `<img>`, the pads, `</img>`."""
        start = self.get_hf_config().vision.image_start_id
        return [start, *[start + 2] * IMAGE_SPAN, start + 1]


class QwenVLDummyInputsBuilder(BaseDummyInputsBuilder[QwenVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(image_placeholder(i) for i in range(1, mm_counts.get("image", 0) + 1))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> dict:
        size = self.info.get_hf_config().vision.image_size
        images = self._get_dummy_images(
            width=size,
            height=size,
            num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image") if mm_options else None,
        )
        return {"image": images}


class QwenVLMultiModalProcessor(BaseMultiModalProcessor[QwenVLProcessingInfo]):
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        """Pixels [N, 3, S, S] of the pictures; Qwen-VL has no transformers processor."""
        if hf_kwargs:
            raise ValueError(f"Qwen-VL's image processing takes no options, got {sorted(hf_kwargs)}")
        images = list(hf_data.get("images") or [])
        for image in images:
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"Qwen-VL takes pictures as PIL images or image URLs, not {type(image).__name__}: "
                    "its pixels are made with PIL's bicubic resize, as the original's"
                )
        size = self.info.get_hf_config().vision.image_size
        return BatchFeature({PIXELS: preprocess(images, size)})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            PIXELS: MultiModalFieldConfig.batched("image"),
            EMBEDDINGS: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        # the prompt already holds the spans: each is found and kept, its pads take the features
        span = self.info.image_span()
        pad = span[1]
        return [
            PromptReplacement(
                modality="image",
                target=span,
                replacement=PromptUpdateDetails.select_token_id(span, embed_token_id=pad),
            )
        ]

    def _apply_prompt_updates(self, token_ids: list[int], mm_prompt_updates):
        """The spans' places; a ValueError when the prompt's spans and its pictures do not pair up."""
        new_ids, match_result, placeholders = self._apply_token_matches_with_placeholders(
            token_ids, mm_prompt_updates
        )
        spans = token_ids.count(self.info.image_span()[0])
        found = sum(len(items) for items in placeholders.values())
        wanted = sum(len(updates) for updates in mm_prompt_updates.values())
        if not spans == found == wanted:
            raise ValueError(
                f"the prompt has {spans} image spans for {wanted} pictures: each picture takes an empty "
                "span `<img></img>` of its own, in order (a reference between the tags is not read)"
            )
        return new_ids, {modality: items for modality, items in placeholders.items() if items}
