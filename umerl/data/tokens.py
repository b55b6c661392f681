"""The token vocabulary UME-R1 adds to a multimodal LLM, and the completion format."""

from __future__ import annotations

DISC_EMB = "<disc_emb>"
GEN_EMB = "<gen_emb>"
EMBEDDING_TOKENS = (DISC_EMB, GEN_EMB)

# Plain text in the completion; never added to the vocabulary as special tokens.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Qwen-VL chat and vision markers (shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Rows copied into the new tokens' input embeddings, as the UME-R1 authors did;
# any existing token works when these are absent (e.g. in the tiny tokenizer).
EMBEDDING_TOKEN_INIT_SOURCES = {DISC_EMB: "<|object_ref_start|>", GEN_EMB: "<|object_ref_end|>"}


def format_completion(reasoning: str, summary: str) -> str:
    """The completion the policy is trained to write: think, answer, then the embedding token."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{summary}{ANSWER_CLOSE}{GEN_EMB}"
