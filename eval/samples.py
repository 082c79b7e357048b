"""One benchmark item as the model sees it (`Sample`), shared by every loader (benchmarks.py, mme.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

UNKNOWN_CATEGORY = "(unreadable row)"


@dataclass
class Sample:
    """One benchmark item as the model sees it: the query, the image (or None) and where it belongs."""

    id: str  # unique within a run, stable across runs of the same data
    benchmark: str
    category: str  # MM-SafetyBench scenario, VLSBench category, "all" for VLSafe
    query: str
    image: Optional[str]  # absolute path, or None for a text-only sample
    mode: str = "image"  # MM-SafetyBench: SD | SD_TYPO | TYPO | text
    subcategory: Optional[str] = None
    extra: dict = field(default_factory=dict)  # e.g. VLSBench image_description / safety_reason
    error: Optional[str] = None  # why this sample cannot be run (recorded and counted, never dropped)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(**{k: d.get(k) for k in ("id", "benchmark", "category", "query", "image", "mode", "subcategory",
                                            "error")}, extra=d.get("extra") or {})


def path_str(p: Optional[Path]) -> Optional[str]:
    return str(p.resolve()) if p is not None else None
