"""Write a small diffusers pipeline folder to try ``dkit import`` on, without downloading anything.

    python examples/build_diffusers_pipeline.py demo_pipeline          # UNet2DModel + DDIMScheduler
    python examples/build_diffusers_pipeline.py demo_flow --flow --shift 3   # + FlowMatchEuler...

The U-Net takes 1 x 8 x 8 images (dkit's digits) and has random weights (seed ``--seed``): the
folder has the layout and the files of a real pipeline saved with ``save_pretrained``
(``model_index.json``, ``unet/config.json``, ``unet/diffusion_pytorch_model.safetensors``,
``scheduler/scheduler_config.json``), so every command of the walk-through in
``docs/diffusers.md`` runs on it in seconds; its samples are not digits. Point the same commands
at your own pipeline folder instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build(folder: Path, flow: bool = False, shift: float = 1.0, seed: int = 0) -> Path:
    """Save the pipeline into ``folder`` (created) and return it."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=8)
    if flow:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    else:  # a v-prediction chain of 1000 steps, as DDIMPipeline saves it
        scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction",
                                            clip_sample=False)
    # DDPMPipeline only frames the folder: it keeps the scheduler as given
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the pipeline")
    parser.add_argument("--flow", action="store_true",
                        help="a flow-matching model (FlowMatchEulerDiscreteScheduler)")
    parser.add_argument("--shift", type=float, default=1.0, help="its time shift (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    folder = build(args.folder, args.flow, args.shift, args.seed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
