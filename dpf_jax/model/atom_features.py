"""The CGCNN atom feature table (92 features per element) shipped with the package.

`cgcnn_feature_table()` returns a float32 array of shape [101, 92]: row Z is the CGCNN vector of
element Z (Z = 1..100), row 0 is the "unknown" token (all zeros) used for masked atoms in
denoising pre-training and for padding nodes. Generated once from jarvis-tools' copy of the
CGCNN `atom_init.json` (the file the reference Matformer reads) by
`scripts/make_atom_features.py`; see that script for provenance.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

TABLE_PATH = pathlib.Path(__file__).with_name("cgcnn_atom_features.json")
NUM_ATOM_FEATURES = 92
UNKNOWN_SPECIES = 0  # the row used for masked atoms and padding
MAX_ATOMIC_NUMBER = 100


@functools.lru_cache(maxsize=1)
def _load() -> np.ndarray:
    doc = json.loads(TABLE_PATH.read_text())
    table = np.asarray(doc["features"], dtype=np.float32)
    if table.shape != (MAX_ATOMIC_NUMBER + 1, NUM_ATOM_FEATURES):
        raise ValueError(f"{TABLE_PATH}: unexpected table shape {table.shape}")
    if np.any(table[UNKNOWN_SPECIES] != 0):
        raise ValueError(f"{TABLE_PATH}: row 0 (unknown token) must be all zeros")
    table.setflags(write=False)
    return table


def cgcnn_feature_table() -> np.ndarray:
    """float32 [101, 92]; row Z = element Z, row 0 = unknown/mask/padding (zeros). Read-only."""
    return _load()
