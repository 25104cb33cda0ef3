"""What the VQVAE and VAR configs share: the scale schedule ``patch_nums`` and what follows from it, the
validation of fields and reading a config back from a file.

Legend: L all tokens, l = pn * pn tokens of one scale.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

# (holds, config key, what was expected, the value found)
Check = tuple[bool, str, str, Any]


class ScaleConfig:
    """Base of the model config dataclasses; subclasses declare ``patch_nums`` (smallest scale first)."""

    patch_nums: tuple[int, ...]

    def schedule_checks(self) -> list[Check]:
        """The checks of ``patch_nums``; call after converting it to a tuple of ints."""
        pns = self.patch_nums
        return [
            (len(pns) >= 1 and min(pns) >= 1, "patch_nums", "non-empty, >= 1", pns),
            (
                all(a < b for a, b in zip(pns, pns[1:])),
                "patch_nums",
                "strictly increasing (small to large)",
                pns,
            ),
        ]

    def raise_failed(self, checks: list[Check]) -> None:
        """Raise a ValueError naming the first failed check's key, the expected and the found value."""
        for ok, key, expected, found in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}.{key} must be {expected}, found {found!r}")

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale in the token sequence."""
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    @classmethod
    def from_dict(cls, config: dict, source: str = "<dict>"):
        """The config stored in a file (``source`` names it in errors); unknown keys are an error."""
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown {cls.__name__} keys {unknown}")
        return cls(**config)
