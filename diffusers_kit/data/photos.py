"""Patches of the public-domain (CC0 or public domain) photographs scikit-image installs.

scikit-image's wheel carries a few photographs in ``skimage/data`` (its other sample data are
fetched on demand; none of those is used). They are decoded here with Pillow from that folder
without importing scikit-image, so loading never touches the network. Each photograph's
author, source and licence are in :data:`SKIMAGE_PHOTOGRAPHS` (as the docstrings of
``skimage.data`` state them); all are CC0 or in the public domain.

Colour photographs: ``astronaut`` (512 x 512), ``chelsea`` (300 x 451), ``coffee``
(400 x 600), ``rocket`` (427 x 640), ``hubble_deep_field`` (872 x 1000), ``retina``
(1411 x 1411). Grayscale photographs, their one channel repeated in all three (patches stay
``(3, s, s)`` and gray): ``camera``, and the textures ``brick``, ``grass``, ``gravel``
(512 x 512 each). The patches, the zoom and the disjoint train / held-out regions are those of
:mod:`diffusers_kit.data.patches`.

Needs the optional ``photos`` extra (``pip install diffusers_kit[photos]``: scikit-image).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from diffusers_kit.data.patches import PhotoPatches, PhotoRecord

SkimagePhoto = Literal["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                       "camera", "brick", "grass", "gravel"]

_CC0 = ("CC0 1.0", "https://creativecommons.org/publicdomain/zero/1.0/")
# public domain, with where that is stated
_NASA_IMAGES = ("public domain", "https://flic.kr/p/r9qvLn")
_SPACEX = ("public domain", "http://arstechnica.com/tech-policy/2015/03/"
           "elon-musk-puts-spacex-photos-into-the-public-domain/")
_NASA_MEDIA = ("public domain",
               "http://www.nasa.gov/audience/formedia/features/MP_Photo_Guidelines.html")


def _record(name: str, file: str, shape: tuple[int, int], grayscale: bool, title: str,
            author: str, source: str, licence: tuple[str, str]) -> PhotoRecord:
    return PhotoRecord(name, file, "skimage", "data", "photos", shape, grayscale, title, author,
                       source, *licence)


#: scikit-image's bundled photographs, with the licence its ``skimage.data`` docstrings state.
SKIMAGE_PHOTOGRAPHS: dict[str, PhotoRecord] = {r.name: r for r in (
    _record("astronaut", "astronaut.png", (512, 512), False,
            "the astronaut Eileen Collins", "NASA (Great Images database)",
            "https://flic.kr/p/r9qvLn", _NASA_IMAGES),
    _record("chelsea", "chelsea.png", (300, 451), False, "Chelsea the cat",
            "Stefan van der Walt", "scikit-image", _CC0),
    _record("coffee", "coffee.png", (400, 600), False, "a coffee cup (Pikolo Espresso Bar)",
            "Rachel Michetti", "scikit-image", _CC0),
    _record("rocket", "rocket.jpg", (427, 640), False, "the launch of DSCOVR on a Falcon 9",
            "SpaceX", "https://www.flickr.com/photos/spacexphotos/16511594820/", _SPACEX),
    _record("hubble_deep_field", "hubble_deep_field.jpg", (872, 1000), False,
            "the Hubble eXtreme Deep Field", "NASA",
            "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/", _NASA_MEDIA),
    _record("retina", "retina.jpg", (1411, 1411), False, "a fundus photograph of a left eye",
            "Mikael Häggström",
            "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
            _CC0),
    _record("camera", "camera.png", (512, 512), True, "a man with a camera (gray)",
            "Lav Varshney", "scikit-image", _CC0),
    _record("brick", "brick.png", (512, 512), True, "a brick wall (gray texture)",
            "CC0Textures (Bricks25)", "https://cc0textures.com/view.php?tex=Bricks25", _CC0),
    _record("grass", "grass.png", (512, 512), True, "grass (gray texture)",
            "linolafett (DeviantArt)",
            "https://www.deviantart.com/linolafett/art/Grass-01-434853879", _CC0),
    _record("gravel", "gravel.png", (512, 512), True, "gravel (gray texture)",
            "CC0Textures (Gravel04)", "https://cc0textures.com/view.php?tex=Gravel04", _CC0),
)}


class Photos(PhotoPatches):
    """Colour patches of scikit-image's CC0 / public-domain photographs, in ``[-1, 1]``,
    ``(3, s, s)``, labels = index in ``images``; grayscale photographs repeat their channel.

    Args:
        size: side of a patch in pixels (32 or 64 for the shipped specs; any from 8).
        zoom: photograph pixels per patch pixel: a patch is a ``size * zoom`` crop reduced by
            area averaging; every photograph used must hold two blocks of 1.5 crops (chelsea,
            300 x 451, the smallest: ``size * zoom`` at most 150).
        count: number of patches, training and held-out together.
        heldout_fraction: fraction of the patches held out (cut from a reserved region of each
            photograph that no training patch touches).
        seed: seed of the held-out regions and of the patch positions.
        images: which photographs to cut (the colour ones astronaut, chelsea, coffee, rocket,
            hubble_deep_field, retina; the gray camera, brick, grass, gravel); patches are
            spread evenly.
    """

    photographs = SKIMAGE_PHOTOGRAPHS

    def __init__(
        self,
        size: Annotated[int, Field(ge=8, le=512)] = 32,
        zoom: Annotated[int, Field(ge=1, le=64)] = 2,
        count: Annotated[int, Field(ge=2, le=1_000_000)] = 8000,
        heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
        seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
        images: Annotated[list[SkimagePhoto], Field(min_length=1)] = [  # noqa: B006
            "astronaut", "chelsea", "coffee", "rocket"],
    ) -> None:
        super().__init__(size, zoom, count, heldout_fraction, seed, images)
