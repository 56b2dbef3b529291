"""The datamodule under 2-process DDP (gloo, ddp_spawn): generation once, every val image on exactly one rank."""

import lightning as L
import pytest
import torch

from proscale.data import SyntheticDataModule


class RecordImageIds(L.LightningModule):
    """A do-nothing model that records which validation images each rank sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []
        self.result: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        assert batch["images"].shape[1:] == (3, 64, 64)
        return (self.weight * batch["images"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen.extend(batch["image_ids"])

    def on_validation_epoch_end(self):
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, self.seen)
        self.seen = []
        if self.global_rank == 0:
            torch.save(gathered, self.trainer.default_root_dir + "/seen.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_two_process_ddp_splits_validation_without_duplicates(tmp_path):
    dm = SyntheticDataModule(
        root=tmp_path / "syn", num_train=8, num_val=7, height=64, width=64, batch_size=2, num_workers=0
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(RecordImageIds(), datamodule=dm)
    seen = torch.load(tmp_path / "seen.pt")
    assert sorted(x for part in seen for x in part) == list(range(1, 8))  # each image exactly once
    assert sorted(len(part) for part in seen) == [3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".syn")]  # no temporary folders left
