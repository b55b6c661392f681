"""The UME-R1 prompt: one template serves queries and targets, both embedding modes."""

from __future__ import annotations

from typing import Any

from umerl.data.formats import Side
from umerl.data.tokens import DISC_EMB

# The instruction the UME-R1 authors append after <disc_emb> (their training and eval code).
EMBED_INSTRUCTION = (
    "Represent the above input text, images, videos, or any combination of the three as "
    "embeddings. First output the thinking process in <think> </think> tags and then summarize "
    "the entire input in a word or sentence. Finally, use the <gen_emb> tag to represent the "
    "entire input."
)

# Text-only inputs still pass through the vision tower, as in the authors' code.
BLANK_IMAGE_SIZE = 28


def user_content(side: Side) -> list[dict[str, Any]]:
    """Media first, then the text, the <disc_emb> marker and the embedding instruction."""
    content: list[dict[str, Any]] = []
    if side.is_text_only:
        content.append({"type": "image"})
    content.extend({"type": "image"} for _ in side.images)
    if side.video:
        content.append({"type": "video"})
    content.append({"type": "text", "text": f"{side.text}\n{DISC_EMB}\n{EMBED_INSTRUCTION}"})
    return content


def build_messages(side: Side) -> list[dict[str, Any]]:
    return [{"role": "user", "content": user_content(side)}]


def render_prompt(tokenizer: Any, side: Side) -> str:
    """The prompt string, chat template applied, ending with the assistant generation prompt."""
    return tokenizer.apply_chat_template(
        build_messages(side), tokenize=False, add_generation_prompt=True
    )
