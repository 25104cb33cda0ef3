"""Every metric of varctl, as torchmetrics ``Metric`` classes or plain functions.

- ``codebook``: per-scale codebook usage, perplexity and dead codes of the tokenizer.
- ``tokens``: teacher-forcing cross-entropy and accuracy per scale of the VAR.
- ``control``: how well samples follow their control maps (edge F1, depth RMSE, segmentation mIoU).
- ``classifier``: the small class judge the demo scores samples with (``tools/score_samples.py``).
"""
