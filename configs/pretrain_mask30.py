"""DPF pre-training: mask 30% of each crystal's atoms (unknown type) and predict them."""

from configs import pretrain_base


def get_config():
    c = pretrain_base.get_config()
    c.pretrain.mask_fraction = 0.3
    return c
