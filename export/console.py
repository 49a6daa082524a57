"""What the export step prints: its own progress lines, each library warning once, no library progress bars.

diffusers and transformers log the same warning for every pipeline call (CLIP's truncation notice once per golden
with the long prompt) and draw a progress bar for every load and save; over a whole export that buries the lines
that matter. Warnings are not hidden: the first of each is shown.
"""

from __future__ import annotations

import logging
import os
import warnings


class _OncePerMessage(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_libraries() -> None:
    """Called once by `python -m export` before any work."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.simplefilter("once")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    once = _OncePerMessage()
    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        for h in lib.get_logger().handlers:  # the library's root logger, with its handler set up
            h.addFilter(once)
