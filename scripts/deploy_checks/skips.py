"""The one list of checkov checks the project skips, each with its reason."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .report import CheckFailed

SKIPS_FILE = Path("deploy") / "checkov-skips.yaml"
CHECK_ID = re.compile(r"^CKV2?_[A-Z0-9]+_[0-9]+$")


@dataclass
class Skip:
    id: str
    scope: str
    reason: str


def load(root: Path) -> list[Skip]:
    path = root / SKIPS_FILE
    data = yaml.safe_load(path.read_text()) or {}
    skips = []
    seen = set()
    for i, entry in enumerate(data.get("skips") or []):
        where = f"{SKIPS_FILE} skips[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"id", "scope", "reason"}:
            raise CheckFailed(f"{where}: expected keys id, scope, reason")
        cid, scope, reason = entry.get("id", ""), entry.get("scope", ""), " ".join(str(entry.get("reason", "")).split())
        if not CHECK_ID.match(cid):
            raise CheckFailed(f"{where}: {cid!r} is not a checkov check id")
        if scope not in ("kubernetes", "terraform", "dockerfile"):
            raise CheckFailed(f"{where}: scope must be kubernetes, terraform or dockerfile")
        if len(reason) < 20:
            raise CheckFailed(f"{where}: {cid} needs a reason (a sentence, not {reason!r})")
        if cid in seen:
            raise CheckFailed(f"{where}: {cid} is listed twice")
        seen.add(cid)
        skips.append(Skip(cid, scope, reason))
    return skips
