"""A scientist's package installed the way pip would, for tests: a module plus a dist-info
directory whose entry_points.txt registers its functions (under dockercomp.tasks,
dockercomp.validators, ...). Put ``root`` on PYTHONPATH (or sys.path) to install it."""

from __future__ import annotations

from pathlib import Path


def install_package(root: Path, name: str, module: str, entry_points: str) -> Path:
    """Write ``name.py`` and ``name-1.0.dist-info`` into ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text(module)
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return root
