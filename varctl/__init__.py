"""varctl: a Lightning framework for scale-wise visual autoregressive (VAR) image generation.

`varctl.models` holds the plain-PyTorch networks (tokenizer, VAR); `varctl.lit` the LightningModules;
`python -m varctl` the command line.
"""

__version__ = "0.1.0"
