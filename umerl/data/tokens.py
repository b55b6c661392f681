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

# Tokens that must not appear in a side's text (nor in a completion, but for its final
# <gen_emb>): the processor counts the vision placeholders against the side's media ("prompt
# has 2 <|image_pad|> but 1 media"), a chat marker ends the user turn early, and an embedding
# token would be taken for the place the embedding is read. The reasoning tags are not here:
# the format is the completion's (the format reward reads only the completion), so a
# "<think>" quoted in an input is plain text to it.
CONTROL_TOKENS = (*QWEN_SPECIAL_TOKENS, "<|vision_pad|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", *EMBEDDING_TOKENS)


def control_token_in(text: str, tokens: tuple[str, ...] = CONTROL_TOKENS) -> str | None:
    """The first of ``tokens`` in ``text`` (leftmost), or None. The one check of data
    loading, evaluation and the serving edge."""
    if "<" not in text:
        return None
    found = [(text.find(token), token) for token in tokens if token in text]
    return min(found)[1] if found else None


def control_token_problem(text: str) -> str | None:
    """Why ``text`` cannot go into a prompt, or None: the message every caller shows after
    naming the file:line or request field."""
    token = control_token_in(text)
    if token is None:
        return None
    return (f"holds {token}, a token the model's chat template or processor gives a meaning "
            "(a vision placeholder, a chat marker or an embedding token); remove it from the text")


# Rows copied into the new tokens' input embeddings, as the UME-R1 authors did;
# any existing token works when these are absent (e.g. in the tiny tokenizer).
EMBEDDING_TOKEN_INIT_SOURCES = {DISC_EMB: "<|object_ref_start|>", GEN_EMB: "<|object_ref_end|>"}


def format_completion(reasoning: str, summary: str) -> str:
    """The completion the policy is trained to write: think, answer, then the embedding token."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{summary}{ANSWER_CLOSE}{GEN_EMB}"
