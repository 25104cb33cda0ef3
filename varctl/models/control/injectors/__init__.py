"""The control injectors, one file each behind ``base.Injector``: how the encoded control enters the VAR
(``ControlConfig.injector``)."""

from __future__ import annotations

from varctl.models.control.injectors.base import Context, Injector, Session
from varctl.models.control.injectors.car import CARInjector
from varctl.models.control.injectors.controlar import ControlARInjector
from varctl.models.control.injectors.ecm import ECMInjector
from varctl.models.control.injectors.prefill import PrefillInjector
from varctl.models.control.injectors.scalar import ScalarInjector

INJECTOR_CLASSES: dict[str, type[Injector]] = {
    cls.name: cls for cls in (ScalarInjector, ControlARInjector, CARInjector, PrefillInjector, ECMInjector)
}

__all__ = ["Context", "Injector", "Session", "INJECTOR_CLASSES"]
