"""Resume points of the layer loop: the propagated activations after a layer plus a small state.

Written after every layer as: a new ``hidden-NNNNN.safetensors`` (temp + rename), then
``state.json`` pointing at it (temp + rename: the commit point), then older hidden files are
removed. A kill at any instant leaves either the previous or the new consistent pair.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import log

_META = {"format": "pt"}


class ResumePoint:
    def __init__(self, directory: Path, run_id: str):
        self.dir = Path(directory)
        self.run_id = run_id

    def load(self) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor] | None] | None:
        """(state, hidden states per batch, the unquantized stream's per batch or None) of a previous
        run with the same run_id, else None."""
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("run_id") != self.run_id:
            log.warning(f"{self.dir}: a previous partial run used other inputs or parameters; starting over")
            return None
        hidden = load_file(str(self.dir / state["hidden"]))
        n = sum(1 for k in hidden if k.startswith("b"))
        fp = [hidden[f"f{i}"] for i in range(n)] if "f0" in hidden else None
        return state, [hidden[f"b{i}"] for i in range(n)], fp

    def save(self, next_layer: int, hidden: list[torch.Tensor], fp_hidden: list[torch.Tensor] | None = None,
             **extra: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"hidden-{next_layer:05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        tensors = {f"b{j}": h.contiguous().cpu() for j, h in enumerate(hidden)}
        tensors.update({f"f{j}": h.contiguous().cpu() for j, h in enumerate(fp_hidden or [])})
        save_file(tensors, str(tmp), metadata=_META)
        os.replace(tmp, self.dir / name)
        state = {"run_id": self.run_id, "next_layer": next_layer, "hidden": name, **extra}
        stmp = self.dir / "state.json.tmp"
        stmp.write_text(json.dumps(state, indent=1))  # key order kept: callers may rely on it
        os.replace(stmp, self.dir / "state.json")
        for old in self.dir.glob("hidden-*.safetensors"):
            if old.name != name:
                old.unlink()
