"""model.max_pixels: the image processor's largest image area, where every model layer
consumer builds it (umerl.model.loading), checked by the schema and set in the GPU recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from umerl.config.recipe import ConfigError, load_recipe
from umerl.data.formats import Side
from umerl.model.loading import load_encoder, load_policy, save_policy

PATCH = 14  # the tiny Qwen2-VL's patch side in pixels, as Qwen2-VL's


@pytest.fixture(scope="module")
def large_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "large.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    return str(path)


def patches_and_tokens(encoder, image: str) -> tuple[int, int]:
    prompt = encoder.encode(Side(text="an image", images=(image,)))
    t, h, w = prompt.image_grid_thw[0].tolist()
    assert prompt.pixel_values.shape[0] == t * h * w
    return t * h * w, prompt.input_ids.count(encoder.image_pad_id)


@pytest.mark.parametrize("max_pixels", [784, 2 * 784, 5000])
def test_a_large_image_gets_at_most_max_pixels_over_patch_area_patches(
        tiny_model_dir, large_image, max_pixels):
    """The tiny processor's own bound is 112 x 112 px (at most 64 patches; 48 for this
    image's aspect); under a smaller bound the 300 x 200 image gets at most max_pixels / 14^2
    patches, a quarter of that in tokens, and the encoder's header-only count (prompt_length)
    agrees with the encoded prompt."""
    default, _ = patches_and_tokens(load_encoder(tiny_model_dir), large_image)
    encoder = load_encoder(tiny_model_dir, max_pixels)
    patches, tokens = patches_and_tokens(encoder, large_image)
    assert default == 48
    assert patches <= max_pixels // (PATCH * PATCH) < default
    assert tokens == patches // 4
    side = Side(text="an image", images=(large_image,))
    assert encoder.prompt_length(side) == len(encoder.encode(side).input_ids)


def test_the_policy_keeps_the_bound_and_its_saved_checkpoint_carries_it(
        tiny_model_dir, large_image, tmp_path: Path):
    bundle = load_policy(tiny_model_dir, max_pixels=784)
    assert patches_and_tokens(bundle.encoder, large_image) == (4, 1)
    save_policy(bundle, tmp_path / "saved")
    assert patches_and_tokens(load_encoder(tmp_path / "saved"), large_image) == (4, 1)


def test_a_bound_below_one_merged_token_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="model.max_pixels"):
        load_recipe(None, ["model.max_pixels=100"])
    with pytest.raises(ValueError, match="max_pixels"):
        load_encoder(tiny_model_dir, 784 - 1)  # the loader's own check, past the schema


def test_gpu_recipes_bound_images():
    for recipe in sorted(Path("recipes").glob("qwen2vl_*.yaml")):
        assert load_recipe(recipe, []).model.max_pixels == 1280 * 28 * 28, recipe
    assert load_recipe(None, []).model.max_pixels is None


def test_evaluation_loads_the_policy_with_the_recipes_bound(tiny_model_dir, large_image,
                                                            tmp_path: Path):
    """`umerl eval` and the run's evaluations of a checkpoint the run did not write (the base
    model's "before") see the images the run trains on, not the checkpoint's own bound."""
    from umerl.eval.runner import eval_settings, policy_and_engine

    settings = eval_settings(load_recipe(None, [f"output_dir={tmp_path}",
                                                "model.max_pixels=784"]))
    assert settings.max_pixels == 784
    bundle, _, _ = policy_and_engine(tiny_model_dir, "float32", "cpu", 4, settings.max_pixels)
    assert patches_and_tokens(bundle.encoder, large_image) == (4, 1)
    assert eval_settings(load_recipe(None, [f"output_dir={tmp_path}"])).max_pixels is None
