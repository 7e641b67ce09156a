"""DPF pre-training: Gaussian noise of 0.3 Å on atom positions; predict the displacement."""

from configs import pretrain_base


def get_config():
    c = pretrain_base.get_config()
    c.pretrain.position_scale = 0.3
    return c
