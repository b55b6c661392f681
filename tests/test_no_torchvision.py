"""The model layer loads Qwen-VL processors without torchvision, on every supported transformers.

CPU venvs never hold torchvision (it breaks beside the CPU torch), and the GPU device check runs
where it may be missing. transformers 5.16 and 5.17 (below the range umerl now requires)
then export `transformers.AutoImageProcessor` as a placeholder that raises "requires the
Torchvision library" on first use; 5.18 and 5.19 export the real class. The subprocess below
hides torchvision and puts that same placeholder at the package root whatever version is
installed, so the test means the same on every version: it fails if umerl/model reaches for
anything torchvision-bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
sys.modules["torchvision"] = None  # `import torchvision` raises, find_spec says it is absent

import transformers
from transformers.utils import import_utils

try:
    import torchvision  # noqa: F401
    blocked = False
except ImportError:
    blocked = True


class AutoImageProcessor(metaclass=import_utils.DummyObject):
    _backends = ["torchvision"]  # transformers 5.16/5.17's root export without it


def as_in_transformers_5_17():  # and 5.16
    # on the root module of the moment: importing the model classes may put a new one in place
    sys.modules["transformers"].AutoImageProcessor = AutoImageProcessor

from PIL import Image

from umerl.data.formats import Side
from umerl.model.loading import load_encoder, load_policy
from umerl.model.tiny import FAMILIES, build_tiny_model

out, image = sys.argv[1], sys.argv[2]
Image.new("RGB", (56, 56), (10, 200, 30)).save(image)
report = {"blocked": blocked, "torchvision_available": import_utils.is_torchvision_available(),
          "families": {}}
for family in FAMILIES:
    path = build_tiny_model(f"{out}/{family}", family=family)
    as_in_transformers_5_17()
    encoder = load_encoder(path)
    prompt = encoder.encode(Side(text="a green square", images=(image,)))
    report["families"][family] = {
        "processor": type(encoder.image_processor).__name__,
        "grid": prompt.image_grid_thw.tolist(),
        "rows": int(prompt.pixel_values.shape[0]),
    }
as_in_transformers_5_17()
bundle = load_policy(f"{out}/qwen2_vl")
report["policy_processor"] = type(bundle.encoder.image_processor).__name__
print(json.dumps(report))
"""


def test_qwen_vl_processors_load_without_torchvision(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(tmp_path / "square.png")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["blocked"] and not report["torchvision_available"]
    assert set(report["families"]) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    for family, seen in report["families"].items():
        assert seen["processor"] == "Qwen2VLImageProcessorPil", family
        # one image, one temporal slice; every grid cell is one row of pixel_values
        (t, h, w), = seen["grid"]
        assert t == 1 and seen["rows"] == h * w, (family, seen)
    # 56x56 px at patch 14 (Qwen2-VL's tiny tower, 28 px per merged token): 4 x 4 patches
    assert report["families"]["qwen2_vl"]["grid"] == [[1, 4, 4]]
    assert report["policy_processor"] == "Qwen2VLImageProcessorPil"
