"""Fine-tune on a Materials Project (MEGNet split) task, paper settings: 500 epochs, batch 32.

Task: --config.data.task=formation_energy_per_atom | band_gap | K_VRH | G_VRH. The moduli are
trained and reported as log10(GPa) automatically. Starts from runs/pretrain_mask30 when it exists.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.path = "data/mp_megnet.jsonl.gz"
    c.data.task = "formation_energy_per_atom"
    c.init_checkpoint = "runs/pretrain_mask30"
    return c
