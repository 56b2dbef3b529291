"""Backbone pre-training step: one process with 2 threads vs Lightning DDP (ddp_fork) of P processes (probe).

    PROSCALE_DATA=/path/to/data P=1 python benchmarks/main_job/probes/pretrain_ddp.py     # batch 8, 2 threads
    PROSCALE_DATA=/path/to/data P=2 python benchmarks/main_job/probes/pretrain_ddp.py     # 2 x (batch 4, 1 thread)
    B=4 T=1 P=1 ... (twice at once)                                                        # the same without gradient sync
    COMPRESS=1 P=2 ...                                                                     # gradients all-reduced in fp16
"""

import os
import time

import hydra
import lightning as L
import torch
from _setup import compose_main_job
from omegaconf import OmegaConf

from proscale.lightning.backbone_pretrain import BackbonePretrainModule

processes, steps = int(os.environ.get("P", "1")), int(os.environ.get("STEPS", "200"))
cfg = compose_main_job(with_backbone=False)
datamodule = hydra.utils.instantiate(OmegaConf.merge(cfg.data, {"batch_size": int(os.environ.get("B", 8 // processes))}))
backbone_cfg = OmegaConf.to_container(cfg.model.backbone, resolve=True)
backbone_cfg["pretrained"] = None
module = BackbonePretrainModule(hydra.utils.instantiate(backbone_cfg), datamodule.meta.num_classes, 2e-3, 0.05, steps)
module.to(memory_format=torch.channels_last)  # before DDP wraps it (else gradient strides mismatch its buckets)
if processes == 1:
    torch.set_num_threads(int(os.environ.get("T", "2")))


class StepTimer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 50:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        per_step = (time.perf_counter() - self.start) / (steps - 50) * 1000
        print(f"rank {trainer.global_rank}: {per_step:.1f} ms/step, {torch.get_num_threads()} thread(s)", flush=True)


strategy = {"devices": 1}
if processes > 1:
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = default_hooks.fp16_compress_hook if os.environ.get("COMPRESS") else None
    strategy = {"strategy": DDPStrategy(start_method="fork", ddp_comm_hook=hook), "devices": processes}
trainer = L.Trainer(
    accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
    enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
    callbacks=[StepTimer()], **strategy,
)  # fmt: skip
datamodule.prepare_data()
datamodule.setup("fit")
trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
