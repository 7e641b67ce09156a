"""Fine-tune (or train from scratch) on a JARVIS dft_3d task, paper settings: 500 epochs, batch 32.

Task: --config.data.task=formation_energy_peratom | optb88vdw_bandgap | optb88vdw_total_energy |
ehull | mbj_bandgap. Starts from runs/pretrain_mask30 when it exists
(--config.init_checkpoint="" forces training from scratch).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.path = "data/jarvis_dft3d.jsonl.gz"
    c.data.task = "formation_energy_peratom"
    c.init_checkpoint = "runs/pretrain_mask30"
    return c
