"""dpf_jax: denoising pre-training (DPF) of the Matformer crystal graph transformer, in JAX/Flax.

    import dpf_jax
    model = dpf_jax.load_model("runs/finetune_jarvis")   # a fine-tuning workdir
    y = model.predict([pymatgen_structure, ase_atoms, "x.cif"])

`import dpf_jax` stays light: JAX and the model are imported on the first `load_model` call.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(workdir, which: str = "best", batch_size: int = 64, num_devices=None):
    """The fine-tuned model of a training workdir, ready to `.predict(structures)`.

    See `dpf_jax.predict.load_model` and `dpf_jax.predict.Predictor`.
    """
    from dpf_jax.predict import load_model as _load_model

    return _load_model(workdir, which=which, batch_size=batch_size, num_devices=num_devices)
