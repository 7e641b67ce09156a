"""DPF pre-training: Gaussian noise of scale 0.3 on the six lattice parameters; predict the clean ones."""

from configs import pretrain_base


def get_config():
    c = pretrain_base.get_config()
    c.pretrain.lattice_scale = 0.3
    return c
