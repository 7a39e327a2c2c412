"""What every CLI command shares: progress bars on stderr and informational lines."""

from __future__ import annotations

import sys
from collections.abc import Callable


def progress_bar(desc: str) -> Callable[[int, int, str], None]:
    """A progress callback (done, total, message) drawn as a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, message: str = "") -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            bar = None

    return update


def info(msg: str) -> None:
    print(msg, file=sys.stderr)
