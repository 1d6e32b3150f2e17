"""The progress bars of the scoring paths (torch, STEP pooling, critic): tqdm on stderr, or a silent stand-in that
takes the same calls, so a loop updates its bar without asking whether there is one."""

from __future__ import annotations

from typing import Any


class _Silent:
    """A disabled bar: the calls the scoring paths make, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, *, unit: str, desc: str = "prmbench", total: int | None = None) -> Any:
    """A tqdm bar when ``enabled`` and there is something to do (``total`` not 0; None: not known ahead), else a silent
    one; the caller closes it. Token counts are shown scaled (``1.2Mtok``)."""
    if not enabled or total == 0:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "tok", desc=desc, dynamic_ncols=True)
