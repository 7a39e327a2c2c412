"""Reading the app's ranked tiles in AppTests (shared by tests/app/test_app.py and tests/app/test_latent_app.py)."""

from __future__ import annotations

import re

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
