"""A feature file's provenance (and size) in words: the one wording that `featx info`, the
evaluate and probe reports and `featx cache ls` print.
"""

from __future__ import annotations

from pathlib import Path


def weights_text(prov: dict) -> str:
    """Which weights made the features: a torchvision/timm name, a file (with its hash), or random."""
    w = prov.get("weights") or prov.get("settings", {}).get("weights") or {}
    kind = w.get("kind")
    if kind == "random":
        return f"random (seed {w.get('seed')})"
    if kind == "file":
        return f"file {Path(str(w.get('file'))).name} (sha256 {str(w.get('sha256'))[:12]})"
    return str(w.get("name", "unknown"))


def is_random(prov: dict) -> bool:
    """Whether the features come from a randomly initialised net (tests and smoke runs only)."""
    w = prov.get("weights") or prov.get("settings", {}).get("weights") or {}
    return w.get("kind") == "random"


def settings_text(prov: dict) -> str:
    """The descriptor's settings in one line, e.g. 'vgg16 fc7 Q=256,384,512 stack flip bf16 (1a2b...)'."""
    scales = prov.get("scales", [])
    parts = [str(prov.get("model", "?")), str(prov.get("layer", "?")), "Q=" + ",".join(str(q) for q in scales)]
    if len(scales) > 1:
        parts.append(str(prov.get("aggregate")))
    parts += ["flip" if prov.get("flip") else "no flip", str(prov.get("precision", "?"))]
    if prov.get("weights", {}).get("kind") in ("random", "file"):
        parts.append("weights " + weights_text(prov))
    return " ".join(parts) + f" ({prov.get('settings_hash', '?')})"


def size_text(n: float) -> str:
    """A byte count for people: '812 bytes', '37 KiB', '4.2 MiB', '1.3 GiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("bytes", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return ""
