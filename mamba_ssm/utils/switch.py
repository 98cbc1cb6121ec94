"""On/off settings read from the environment (MAMBA_SSM_COMPILED_STEP, MAMBA_SSM_CPU_KERNEL, ...)."""
from __future__ import annotations

ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_switch(name: str, value, on_means: str, off_means: str) -> bool:
    """The environment variable `name`'s value as a bool: unset or empty -> True; 1/true/yes/on -> True;
    0/false/no/off -> False (any case); anything else is a ValueError naming the variable and its values."""
    if value is None or value.strip() == "":
        return True
    v = value.strip().lower()
    if v in ON or v in OFF:
        return v in ON
    raise ValueError(f"{name}={value!r}: expected one of {', '.join(ON)} ({on_means}) "
                     f"or {', '.join(OFF)} ({off_means})")


def check_bool(where: str, enabled) -> bool:
    """enabled, if it is True or False (a TypeError naming `where` otherwise)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"{where}: enabled must be True or False, got {enabled!r}")
    return enabled
