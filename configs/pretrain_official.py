"""DPF pre-training as in the authors' released code (zjuKeLiu/DPF), not the paper's equations:
every structure corrupted ONCE (deterministically per (seed, id)) with all three corruptions —
mask ⌈0.3·n⌉ atoms, fractional coordinates += U[0, 0.3)³ (wrapped), lattice vectors
+= U[0, 0.3)³ Å — graph rebuilt from the corrupted cell; loss CE + L1(frac) + L1(lattice).
1-atom structures are dropped. See dpf_jax/tasks/official.py (and DESIGN.md §4)."""

from configs import pretrain_base


def get_config():
    c = pretrain_base.get_config()
    c.pretrain.corruption = "official"  # the noise fields (mask_fraction, ...) are not used
    return c
