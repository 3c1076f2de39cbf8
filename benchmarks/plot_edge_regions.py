"""Make docs/edge_regions.png: which regions RALU upsamples first, on scikit-image photographs.

For each photograph (cropped to a multiple of the block size) the image is mapped to [-1, 1] as a VAE
decode would be, scored with Canny edge pixels per 16x16 block (OpenCV 100/200, ``mapping="unit"``) and
the top 10% and top 30% blocks (RALU's 7x and 4x presets) are tinted cyan, the others dimmed.

    python benchmarks/plot_edge_regions.py [--out docs/edge_regions.png] [--detector opencv|gpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ralu_runtime.edges import edge_scores, overlay_mask, region_mask, select_top_blocks  # noqa: E402

IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
RATIOS = (0.1, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/edge_regions.png")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--detector", default="opencv", choices=("opencv", "gpu"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot_edge_regions.py draws with matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import skimage.data

    fig, axes = plt.subplots(len(IMAGES), len(RATIOS), figsize=(4.2 * len(RATIOS), 3.3 * len(IMAGES)))
    for row, name in enumerate(IMAGES):
        im = getattr(skimage.data, name)()
        if im.ndim == 2:
            im = np.stack([im] * 3, axis=-1)
        h, w = (im.shape[0] // args.block) * args.block, (im.shape[1] // args.block) * args.block
        rgb = np.ascontiguousarray(im[:h, :w, :3])
        x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0).unsqueeze(0)
        scores = edge_scores(x, args.block, detector=args.detector)
        grid = tuple(scores.shape[1:])
        m = scores[0].numel()
        for col, r in enumerate(RATIOS):
            k = int(m * r)
            idx = select_top_blocks(scores, k, [torch.Generator().manual_seed(args.seed)])
            mask = region_mask(idx, grid)[0].numpy()
            ax = axes[row, col]
            # selected blocks tinted cyan (visible on red/orange photographs), the rest dimmed
            shown = overlay_mask(overlay_mask(rgb, ~mask, color=(0, 0, 0), alpha=0.55), mask, color=(0, 230, 255), alpha=0.3)
            ax.imshow(shown)
            ax.set_axis_off()
            ax.set_title(f"{name}: top {int(r * 100)}% ({k}/{m} blocks)", fontsize=9)
    fig.suptitle(f"RALU stage-2 upsampling choice: Canny edge pixels per {args.block}x{args.block} block", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
