"""Plain-PyTorch models of varctl: the multi-scale VQ tokenizer, the VAR transformer and its conditions
(the text encoder, the control branch).

This package imports torch only (never lightning or hydra), so the models can be used in any loop. Every
model shares one lifecycle (``lifecycle.py``: ``build``, ``load``, ``save``, ``export_safetensors``). Names
are resolved lazily so that importing one model does not import the others.
"""

_EXPORTS = {
    "VQVAE": "varctl.models.vqvae",
    "VQVAEConfig": "varctl.models.vqvae",
    "VAR": "varctl.models.var",
    "VARConfig": "varctl.models.var",
    "ControlBranch": "varctl.models.control",
    "ControlConfig": "varctl.models.control",
    "TextCondition": "varctl.models.text",
    "TextEncoder": "varctl.models.text",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'varctl.models' has no attribute {name!r}")
