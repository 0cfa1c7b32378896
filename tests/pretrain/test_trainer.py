"""pretrain/trainer.py helpers that need no ranks."""

import torch

from pretrain.trainer import to_device


def test_to_device_moves_every_tensor_of_a_nested_batch_and_keeps_its_shape():
    # "meta" stands in for a GPU: moving there changes the device and nothing else.
    batch = {"src": torch.ones(2, 3, dtype=torch.long), "lengths": (torch.tensor([3, 2]), [torch.zeros(1)]), "name": "b0"}
    moved = to_device(batch, torch.device("meta"))
    assert moved["src"].device.type == "meta" and moved["src"].shape == (2, 3) and moved["src"].dtype == torch.long
    assert isinstance(moved["lengths"], tuple) and isinstance(moved["lengths"][1], list)
    assert moved["lengths"][0].device.type == "meta" and moved["lengths"][1][0].device.type == "meta"
    assert moved["name"] == "b0" and batch["src"].device.type == "cpu"  # the original is left as it was
