#!/usr/bin/env python
"""Generates the CGCNN atom feature table shipped in `dpf_jax/model/cgcnn_atom_features.json`.

Source: the CGCNN `atom_init.json` (Xie & Grossman, PRL 120, 145301, 2018) as distributed with
jarvis-tools (`jarvis/core/atom_init.json`), the file the reference Matformer reads through
`jarvis.core.specie.get_node_attributes(symbol, atom_features="cgcnn")`. It holds a 92-dim
binary vector (concatenated one-hot encodings of binned element properties, CGCNN paper
Table S2) for Z = 1..100.

Output: a [101, 92] table. Row Z (1..100) is the CGCNN vector of element Z; row 0 is the
"unknown" token, all zeros, used for masked atoms (denoising pre-training) and padding nodes.
(The reference falls back to Z=100's row for elements missing from the file; we reject
Z > 100 at data validation instead, see `dpf_jax.data.records.MAX_ATOMIC_NUMBER`.)

Usage:  pip install jarvis-tools && python scripts/make_atom_features.py [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import numpy as np

NUM_FEATURES = 92
MAX_Z = 100
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "dpf_jax" / "model" / "cgcnn_atom_features.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import jarvis
    from jarvis.core import specie

    path = pathlib.Path(specie.cgcnn_feature_json)
    raw = path.read_bytes()
    table_in = json.loads(raw)
    table = np.zeros((MAX_Z + 1, NUM_FEATURES), np.int64)
    for z in range(1, MAX_Z + 1):
        row = table_in[str(z)]
        if len(row) != NUM_FEATURES:
            raise ValueError(f"Z={z}: expected {NUM_FEATURES} features, got {len(row)}")
        table[z] = row
    # cross-check against the accessor the reference uses (keyed by element symbol)
    for z, sym in ((1, "H"), (8, "O"), (26, "Fe"), (92, "U"), (100, "Fm")):
        assert list(table[z]) == list(specie.get_node_attributes(sym, atom_features="cgcnn")), sym

    doc = {
        "description": "CGCNN atom features (92-dim), row Z = element Z (1..100); "
                       "row 0 = unknown/mask/padding token (all zeros).",
        "source": "jarvis-tools jarvis/core/atom_init.json (CGCNN atom_init.json, Xie & Grossman 2018)",
        "jarvis_tools_version": getattr(jarvis, "__version__", "unknown"),
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "shape": list(table.shape),
        "features": table.tolist(),
    }
    text = json.dumps(doc, indent=None, separators=(",", ":"))
    # one row per line keeps the file diffable
    text = text.replace("],[", "],\n[")
    args.out.write_text(text + "\n")
    print(f"wrote {args.out} {table.shape}")


if __name__ == "__main__":
    main()
