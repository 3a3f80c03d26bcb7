"""Progress and events: human lines, or one JSON object per line on stderr (``--json-logs``)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

_state = {"json": False}


def configure(json_logs: bool) -> None:
    _state["json"] = bool(json_logs)


def json_mode() -> bool:
    return _state["json"]


def event(name: str, message: str | None = None, **fields: Any) -> None:
    """Emit an event: stage_start, stage_end, layer, metric, warning, ..."""
    if _state["json"]:
        rec = {"ts": round(time.time(), 3), "event": name, **fields}
        if message:
            rec["message"] = message
        sys.stderr.write(json.dumps(rec, default=str) + "\n")
    else:
        if message is None:
            message = " ".join(f"{k}={v}" for k, v in fields.items())
        prefix = "!!" if name in ("warning", "error") else "--"
        sys.stderr.write(f"{prefix} {message}\n")
    sys.stderr.flush()


def info(message: str, **fields: Any) -> None:
    event("info", message, **fields)


def warning(message: str, **fields: Any) -> None:
    event("warning", message, **fields)


def progress(iterable, total: int | None = None, desc: str = ""):
    """A tqdm bar for humans (with ETA); per-item events in JSON mode."""
    if _state["json"]:
        def gen():
            for i, item in enumerate(iterable):
                yield item
                event("progress", desc=desc, done=i + 1, total=total)
        return gen()
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (batch jobs, CI logs)
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
