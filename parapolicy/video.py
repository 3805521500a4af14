"""Rollout video tools: ``python -m parapolicy.video preview <rollout.mp4> <out.gif>``.

The eval's videos (``python -m parapolicy.eval video=true``) are written by ``parapolicy.evaluation.recording``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from parapolicy.evaluation.recording import preview_indices, read_frames, write_preview

    parser = argparse.ArgumentParser(prog="python -m parapolicy.video", description="Rollout video tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    preview = sub.add_parser("preview", help="an animated GIF/WebP from an eval mp4 (e.g. for the README)")
    preview.add_argument("video", type=Path)
    preview.add_argument("out", type=Path, help="a .gif or .webp path")
    preview.add_argument("--size", type=int, default=160, help="height in pixels (default 160)")
    preview.add_argument("--every", type=int, default=2, help="keep every n-th frame and the last (default 2)")
    preview.add_argument("--fps", type=int, default=20, help="frame rate of the source (default 20)")
    args = parser.parse_args(argv)
    if args.size < 16 or args.every < 1:
        parser.error("--size must be >= 16 and --every >= 1")
    frames = read_frames(args.video)
    write_preview(frames, args.out, size=args.size, every=args.every, fps=args.fps)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, "
          f"{len(preview_indices(len(frames), args.every))} frames)")


if __name__ == "__main__":
    main()
