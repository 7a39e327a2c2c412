"""Helpers of the AppTests (tests/app/): the app's path, the run timeout, reading ranked tiles and images,
pressing Run attribution, a PNG."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

APP = Path(__file__).resolve().parents[1] / "app.py"
# The attribution tests featurize the 1618 digits once per feature set (K=2, k=512): ~15-40 s on two busy cores.
RUN_TIMEOUT = 300

TILE = re.compile(r"^train #(\d+) · class (.+) · score ([+-]\S+)$")  # the caption under a ranked tile


def tiles(at, key: str) -> list[tuple[int, str, float]]:
    """(training index, class, score) of the ranked tiles in the container `key`, in the order shown."""
    out = []
    for element in at.main.get_by_key(key).get("image"):
        for img in element.proto.imgs:
            m = TILE.match(img.caption)
            assert m, img.caption
            out.append((int(m[1]), m[2], float(m[3])))
    return out


def mounted_value(slider) -> float:
    """The λ a browser shows for a select slider it mounts anew: the value the server sends with the element, else
    the element's default. Chromium mounts a slider anew when two runs in a row have not drawn it (seen with
    Playwright, issue 24); one that stays on the page, or is off it for one run, keeps the value it had. The
    options read "0.809" or "0.809 (default)"."""
    p = slider.proto
    shown = p.raw_value[0] if p.set_value else p.options[int(p.default[0])]
    return float(shown.split()[0])


def shown_images(at) -> list[str]:
    """Captions of every image on the page (one st.image call can hold many images)."""
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


def press_run_attribution(at, K: int = 1, k: int = 512, timeout: int = RUN_TIMEOUT):
    """The Attribute page's feature form at K timesteps and projection k, then Run attribution; returns `at`."""
    at.number_input(key="attr_K").set_value(K)
    at.selectbox(key="attr_k").set_value(k)
    next(b for b in at.button if b.label == "Run attribution").click().run(timeout=timeout)
    return at


def png_bytes(size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200).save(buf, format="PNG")
    return buf.getvalue()
