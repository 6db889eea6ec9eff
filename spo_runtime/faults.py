"""Fault injection for tests only: `SPO_FAULTS`, ignored unless set, never for production.

Grammar: comma-separated faults, each `name` or `name:key=value[:key=value...]`, e.g.
`SPO_FAULTS=engine_crash:step=3`. Unknown names or keys are a ConfigError at start, so a typo in a
test cannot silently test nothing.

    engine_crash:step=N   the engine thread dies (an exception no step handler catches) once N steps ran
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

KNOWN: dict[str, dict[str, type]] = {
    "engine_crash": {"step": int},
}


class InjectedFault(BaseException):
    """Raised by an injected fault; a BaseException so that no `except Exception` handler absorbs it."""


@dataclass(frozen=True)
class Faults:
    active: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> Faults:
        active: dict[str, dict] = {}
        for item in filter(None, (t.strip() for t in (text or "").split(","))):
            name, *pairs = item.split(":")
            if name not in KNOWN:
                raise ConfigError("SPO_FAULTS", f"unknown fault {name!r} (known: {', '.join(KNOWN)})")
            params = {}
            for pair in pairs:
                key, _, value = pair.partition("=")
                if key not in KNOWN[name]:
                    raise ConfigError("SPO_FAULTS", f"{name}: unknown parameter {key!r} (known: {', '.join(KNOWN[name])})")
                try:
                    params[key] = KNOWN[name][key](value)
                except ValueError:
                    raise ConfigError("SPO_FAULTS", f"{name}: {key} must be {KNOWN[name][key].__name__}, got {value!r}") from None
            missing = set(KNOWN[name]) - set(params)
            if missing:
                raise ConfigError("SPO_FAULTS", f"{name}: missing {', '.join(sorted(missing))}")
            active[name] = params
        return cls(active)

    def get(self, name: str) -> dict | None:
        return self.active.get(name)


NONE = Faults()
