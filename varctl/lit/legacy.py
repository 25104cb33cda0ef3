"""Checkpoints of the VAR and control stages written before the model lifecycle (commit e886d35 and older):
their state_dict in today's names, so ``fit ckpt_path=OLD.ckpt`` resumes them. Model files need nothing:
``VAR.load`` and ``ControlBranch.load`` follow the prefixes each checkpoint records."""

from __future__ import annotations

# the trained network was "var." (the control stage's wrapper too: "var.var.", "var.control."), its
# average "var_ema.module.", whose "num_updates" counted updates where AveragedModel counts models averaged
PREFIXES = (("var_ema.module.", "ema.module."), ("var.", "model."))
OLD_EMA_COUNT, EMA_COUNT = "var_ema.num_updates", "ema.n_averaged"


def is_legacy(state: dict) -> bool:
    return OLD_EMA_COUNT in state or any(k.startswith("var.") for k in state)


def legacy_state_dict(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key == OLD_EMA_COUNT:
            out[EMA_COUNT] = value + 1  # the initial copy counts as the first average
            continue
        for old, new in PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


# the control branch's first version held its (scalar) projections at its root
CONTROL_RENAMES = {
    "control.proj_weight": "control.injector.proj_weight",
    "control.proj_bias": "control.injector.proj_bias",
}


def upgrade_control_keys(state: dict) -> None:
    """Rename, in place, the first version's control projections (``model.control.proj_weight`` ...)."""
    for key in list(state):
        for old, new in CONTROL_RENAMES.items():
            if key.endswith(old) and key[: -len(old)] in ("model.", "ema.module."):
                state[key[: -len(old)] + new] = state.pop(key)
