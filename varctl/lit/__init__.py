"""Thin LightningModules of the varctl stages (loss, logging, optimizer); the networks live in varctl.models.

Each stage is its own module (``varctl.lit.tokenizer``, ...) imported by its path, so loading one stage does
not import the others.
"""
