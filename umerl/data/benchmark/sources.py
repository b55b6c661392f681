"""Loaders for the raw data the ``umerl-mini`` benchmark is built from.

Every source ships inside an installed PyPI package, so nothing here touches the network:

- scikit-learn: ``load_digits`` (1,797 8x8 handwritten digits) and ``load_sample_images``
  (``china.jpg``, ``flower.jpg``, CC BY 2.0).
- scikit-image: bundled photographs (``skimage.data.<name>()`` for the names in :data:`PHOTOS`,
  each CC0 / public domain per its docstring) and ``lfw_subset`` (100 faces, then 100 non-faces).
- gensim (read as data only, never imported): ``test/test_data/lee.cor`` (50 news documents, one
  per line, Latin-1) and ``similarities0-1.txt`` (50x50 human similarity judgements; only the
  upper triangle and the diagonal are filled).
- timm (read as data only, never imported): ``data/_info/imagenet_synsets.txt`` (the 1,000
  ImageNet-1k synsets in class order) and ``imagenet_synset_to_lemma.txt`` (synset -> lemmas).

Licences and credits are listed in ``SOURCES.md`` next to this file and in :data:`PHOTOS`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENSIM_TEST_DATA = ("test", "test_data")
TIMM_INFO = ("data", "_info")

# ImageNet-1k class indices used as distractor names: 0..268 are fish, birds, reptiles,
# amphibians, invertebrates, marine mammals and dog breeds. Cats (281-285), horses (339) and all
# objects are left out so that no distractor can describe one of the benchmark's photos or faces.
IMAGENET_DISTRACTOR_RANGE = (0, 269)


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (needed as a data source)")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - reported, not fatal
        return "unknown"


# --------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 ``(1797, 8, 8)`` ink levels 0..16 and int64 labels 0..9."""
    from sklearn.datasets import load_digits as _load_digits

    bunch = _load_digits()
    images = np.asarray(bunch.images)
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise ValueError("sklearn digits: expected integer ink levels in 0..16")
    return images.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# scikit-image lfw_subset


def load_lfw_subset() -> tuple[np.ndarray, np.ndarray]:
    """``(images, is_face)``: uint8 ``(200, 25, 25)`` grey crops; the first 100 are faces."""
    from skimage import data

    raw = np.asarray(data.lfw_subset(), dtype=np.float64)
    if raw.shape != (200, 25, 25):
        raise ValueError(f"lfw_subset: unexpected shape {raw.shape}")
    images = np.clip(np.round(raw * 255.0), 0, 255).astype(np.uint8)
    is_face = np.zeros(200, dtype=bool)
    is_face[:100] = True
    return images, is_face


# --------------------------------------------------------------------------------------------
# Photographs


@dataclass(frozen=True)
class Photo:
    """A bundled photograph with hand-written captions.

    The three phrasings are given to different splits (``build.CAPTION_PLAN``: 0 test, 1 rl,
    2 train) so that no caption text is shared between train, rl and test; a split's phrase is
    also the SFT answer of its lines.
    """

    name: str
    package: str  # "scikit-image" or "scikit-learn"
    loader: str  # skimage.data function name, or the sklearn sample image file name
    phrases: tuple[str, str, str]
    license: str
    credit: str


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "scikit-image", "astronaut",
          ("an astronaut in an orange space suit",
           "a smiling woman astronaut holding a helmet",
           "a portrait of an astronaut beside a space shuttle model"),
          "public domain", "NASA (Eileen Collins), via NASA Great Images"),
    Photo("camera", "scikit-image", "camera",
          ("a man filming with a camera on a tripod",
           "a cameraman standing in a field",
           "a photographer looking through a camera on a tripod"),
          "CC0", "Lav Varshney"),
    Photo("coffee", "scikit-image", "coffee",
          ("a cup of coffee on a saucer",
           "an espresso in a red cup on a wooden table",
           "a coffee cup with a spoon on a red saucer"),
          "CC0", "Rachel Michetti (courtesy of Pikolo Espresso Bar)"),
    Photo("chelsea", "scikit-image", "chelsea",
          ("a tabby cat",
           "a close-up of a cat's face with green eyes",
           "a brown striped cat looking at the camera"),
          "CC0", "Stefan van der Walt"),
    Photo("rocket", "scikit-image", "rocket",
          ("a rocket on a launch pad at night",
           "a tall white rocket lit up before launch",
           "a space rocket standing between launch towers at dusk"),
          "public domain", "SpaceX (DSCOVR launch on Falcon 9)"),
    Photo("horse", "scikit-image", "horse",
          ("a black silhouette of a horse",
           "the outline of a horse in black on white",
           "a horse shape filled in solid black"),
          "CC0", "Andreas Preuss (marauder), via openclipart"),
    Photo("coins", "scikit-image", "coins",
          ("ancient coins on a dark background",
           "rows of old Greek coins",
           "coins laid out in rows and columns"),
          "no known copyright restrictions", "Brooklyn Museum collection"),
    Photo("text", "scikit-image", "text",
          ("handwritten equations on a sheet of paper",
           "a slanted close-up of math written in pen",
           "blurry handwritten formulas"),
          "public domain", "Wikipedia (File:Corner.png)"),
    Photo("hubble_deep_field", "scikit-image", "hubble_deep_field",
          ("distant galaxies in deep space",
           "a dark sky full of tiny galaxies",
           "small colorful galaxies on a black background"),
          "public domain", "NASA, Hubble eXtreme Deep Field (HubbleSite)"),
    Photo("retina", "scikit-image", "retina",
          ("the back of a human eye",
           "a retina with red blood vessels",
           "an eye's retina seen as an orange disc"),
          "CC0", "Mikael Häggström, via Wikimedia Commons"),
    Photo("brick", "scikit-image", "brick",
          ("a brick wall",
           "a grey wall made of long bricks",
           "a close-up of grey bricks"),
          "CC0", "CC0Textures (Bricks25), transformed by scikit-image"),
    Photo("grass", "scikit-image", "grass",
          ("grass seen from above",
           "a close-up of dry grass blades",
           "grey blades of grass"),
          "CC0", "linolafett, via DeviantArt"),
    Photo("gravel", "scikit-image", "gravel",
          ("a patch of gravel",
           "small stones covering the ground",
           "a close-up of pebbles"),
          "CC0", "CC0Textures (Gravel04)"),
    Photo("cell", "scikit-image", "cell",
          ("a single cell under a microscope",
           "a bright round cell on a grey background",
           "one floating cell seen through a microscope"),
          "CC0", "Paul Müller et al., Optics Express 26(8), 2018"),
    Photo("immunohistochemistry", "scikit-image", "immunohistochemistry",
          ("stained tissue under a microscope",
           "a tissue slide stained brown and blue",
           "colonic glands in a stained tissue sample"),
          "no known copyright restrictions",
          "Center for Microscopy And Molecular Imaging (CMMI)"),
    Photo("china", "scikit-learn", "china.jpg",
          ("a Chinese tower by a lake",
           "a traditional temple with red pillars",
           "an ornate pagoda on a hill above the water"),
          "CC BY 2.0", "danielbuechele (Flickr), retrieved by Robert Layton"),
    Photo("flower", "scikit-learn", "flower.jpg",
          ("an orange dahlia flower",
           "a round orange flower with many petals",
           "a close-up of an orange flower on a green background"),
          "CC BY 2.0", "vultilion (Flickr), retrieved by Robert Layton"),
)

# Bundled skimage images left out, and why (kept here so SOURCES.md and the code agree).
EXCLUDED_PHOTOS: dict[str, str] = {
    "moon": "no licence statement in its docstring",
    "page": "no licence statement in its docstring",
    "logo": "the scikit-image logo; no licence statement for the image itself",
    "colorwheel": "a synthetic colour wheel, not a photograph; no licence statement",
    "clock": "public domain, but the motion blur leaves nothing recognisable at 112 px",
    "microaneurysms": "CC0, but a crop of a retina image and too close to `retina`",
    "stereo_motorcycle": "Middlebury 2014 stereo data; no licence statement in its docstring",
}


def load_photo(photo: Photo) -> np.ndarray:
    """The photo as an RGB uint8 array ``(H, W, 3)``."""
    if photo.package == "scikit-image":
        from skimage import data

        arr = np.asarray(getattr(data, photo.loader)())
    elif photo.package == "scikit-learn":
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        names = [Path(f).name for f in bunch.filenames]
        arr = np.asarray(bunch.images[names.index(photo.loader)])
    else:  # pragma: no cover - PHOTOS is a constant
        raise ValueError(f"unknown package {photo.package!r}")
    if arr.dtype == bool:
        arr = np.where(arr, 255, 0).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"{photo.name}: expected uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


# --------------------------------------------------------------------------------------------
# gensim Lee corpus


def lee_paths() -> tuple[Path, Path]:
    folder = package_dir("gensim").joinpath(*GENSIM_TEST_DATA)
    return folder / "lee.cor", folder / "similarities0-1.txt"


def load_lee() -> tuple[list[str], np.ndarray]:
    """``(docs, sim)``: the 50 Lee news documents and the symmetric 50x50 human similarity.

    ``lee.cor`` has one document per line (Latin-1; the last line has no newline).
    ``similarities0-1.txt`` holds 50 tab-separated rows with the upper triangle filled, the
    lower triangle zero and ones on the diagonal; it is mirrored here.
    """
    cor, sims = lee_paths()
    docs = [" ".join(line.split()) for line in cor.read_bytes().decode("latin-1").splitlines()]
    docs = [d for d in docs if d]
    rows = [
        [float(x) for x in line.split()]
        for line in sims.read_text(encoding="ascii").splitlines()
        if line.strip()
    ]
    mat = np.asarray(rows, dtype=np.float64)
    n = len(docs)
    if n != 50 or mat.shape != (n, n):
        raise ValueError(f"Lee corpus: {n} docs and a {mat.shape} matrix, expected 50 and 50x50")
    if np.any(np.tril(mat, -1) != 0):
        raise ValueError("Lee similarities: expected an upper-triangular matrix")
    sim = np.triu(mat) + np.triu(mat, 1).T
    return docs, sim


# --------------------------------------------------------------------------------------------
# timm ImageNet lemmas


def load_imagenet_lemmas() -> list[str]:
    """The first lemma of each ImageNet-1k class in :data:`IMAGENET_DISTRACTOR_RANGE`."""
    info = package_dir("timm").joinpath(*TIMM_INFO)
    synsets = info.joinpath("imagenet_synsets.txt").read_text(encoding="utf-8").split()
    lemma_of: dict[str, str] = {}
    for line in info.joinpath("imagenet_synset_to_lemma.txt").read_text(
        encoding="utf-8"
    ).splitlines():
        if "\t" in line:
            wnid, lemmas = line.split("\t", 1)
            lemma_of[wnid] = lemmas.split(",")[0].strip()
    if len(synsets) != 1000:
        raise ValueError(f"imagenet_synsets.txt: {len(synsets)} synsets, expected 1000")
    lo, hi = IMAGENET_DISTRACTOR_RANGE
    out: list[str] = []
    for wnid in synsets[lo:hi]:
        lemma = lemma_of[wnid]
        if lemma not in out:
            out.append(lemma)
    return out


# --------------------------------------------------------------------------------------------
# Provenance, written into tasks.json


def source_records() -> list[dict]:
    """One record per raw source, with licence and credit (the ``sources`` list of tasks.json)."""
    v = {d: package_version(d) for d in ("scikit-learn", "scikit-image", "gensim", "timm")}
    records = [
        {"name": "sklearn_digits", "package": f"scikit-learn=={v['scikit-learn']}",
         "item": "sklearn.datasets.load_digits", "license": "CC BY 4.0 (UCI ML repository)",
         "credit": "E. Alpaydin and C. Kaynak, UCI Optical Recognition of Handwritten Digits",
         "tasks": ["digits_cls", "digits_reason"]},
        {"name": "lfw_subset", "package": f"scikit-image=={v['scikit-image']}",
         "item": "skimage.data.lfw_subset",
         "license": "no licence statement; research data set (see SOURCES.md)",
         "credit": "Labeled Faces in the Wild, Huang et al.; 25x25 crops by scikit-image",
         "tasks": ["faces_cls"]},
    ]
    for p in PHOTOS:
        item = (f"skimage.data.{p.loader}" if p.package == "scikit-image"
                else f"sklearn.datasets.load_sample_images:{p.loader}")
        records.append({"name": f"photo:{p.name}", "package": f"{p.package}=={v[p.package]}",
                        "item": item, "license": p.license, "credit": p.credit,
                        "tasks": ["photo_t2i", "photo_i2t"]})
    records += [
        {"name": "lee_corpus", "package": f"gensim=={v['gensim']}",
         "item": "gensim/test/test_data/lee.cor + similarities0-1.txt",
         "license": "LGPL-2.1 (gensim test data)",
         "credit": "M. D. Lee, B. Pincombe and M. Welsh (2005), news documents from "
                   "the Australian Broadcasting Corporation",
         "tasks": ["lee_text"]},
        {"name": "imagenet_lemmas", "package": f"timm=={v['timm']}",
         "item": "timm/data/_info/imagenet_synsets.txt + imagenet_synset_to_lemma.txt",
         "license": "Apache-2.0 (timm); WordNet lemmas",
         "credit": "WordNet / ImageNet class names",
         "tasks": ["faces_cls", "photo_i2t"]},
    ]
    return records
