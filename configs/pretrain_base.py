"""Shared pre-training settings of the paper: 50 epochs, global batch 256 over all devices,
AdamW lr 1e-3, wd 1e-5, one-cycle; corpus: the shipped unlabeled structures."""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "pretrain"
    c.data.path = "data/pretrain.jsonl.gz"
    c.data.task = ""
    c.train.epochs = 50
    c.train.batch_size = 256
    return c
