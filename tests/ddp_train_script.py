"""Run by tests/models/test_train_ddp.py, alone or under `python -m torch.distributed.run --nproc_per_node N`:
trains the tiny autoencoder and the tiny diffusion UNet a few steps at global batch 8 into OUT_DIR (the loop joins
the process group itself). Ranks other than 0 must not write: their safetensors writer raises."""
from __future__ import annotations

import os
import sys

import torch

from atelier.models.train.loop import Trainer, TrainSettings
from helpers_train import AETask, random_dataset, tiny_diffusion_task

STEPS = 4


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    if int(os.environ.get("RANK", "0")) != 0:
        import safetensors.torch as st

        def refuse(*_a, **_k):
            raise AssertionError(f"rank {os.environ['RANK']} wrote a file")

        st.save_file = refuse
    s = TrainSettings(steps=STEPS, batch_size=8, lr=1e-2, warmup=2, grad_clip=1.0, ema=0.9, seed=5, precision="fp32")
    cpu = torch.device("cpu")
    Trainer(AETask(), random_dataset(12), s, os.path.join(out_dir, "ae.safetensors"), device=cpu).run()
    data = random_dataset(12, size=8, channels=1)
    # no attention: the gradient of an attention key bias is zero in exact arithmetic (softmax ignores a shift), so
    # AdamW turns its rounding noise into steps of the size of the learning rate, in any two runs that round apart
    Trainer(tiny_diffusion_task(attention=False), data, s, os.path.join(out_dir, "unet.safetensors"), device=cpu).run()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
