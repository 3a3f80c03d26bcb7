"""One way to read a user's YAML mapping (recipes, sweep files, Axolotl configs): a dict, or an
``InputError`` of one line naming the file and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError


def load_yaml_mapping(path: Path, *, not_mapping: str, fix: str = "") -> dict[str, Any]:
    """The YAML mapping in ``path`` (empty file: ``{}``). ``not_mapping``: the message when the
    document is not a mapping; ``fix``: appended to the message when the file is not valid YAML."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})" + (f"; {fix}" if fix else "")) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise InputError(f"{path}: {not_mapping}")
    return data
