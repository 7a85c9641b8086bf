"""A closed, explicit name -> object registry (Caffe's layer factory, Keras' `get(identifier)`)."""
import difflib

from dlcli.errors import ConfigError


def did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    if not close:  # case-insensitive second chance: 'dense' -> 'Dense'
        lowered = {k.lower(): k for k in known}
        close = [lowered[str(name).lower()]] if str(name).lower() in lowered else []
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict = {}

    def register(self, *names: str):
        def add(obj):
            for name in names or (obj.__name__,):
                if name in self._items:
                    raise ValueError(f"duplicate {self.kind} name '{name}'")
                self._items[name] = obj
            return obj

        return add

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str):
        if name not in self._items:
            raise ConfigError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name) -> str:
        return f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {', '.join(self.names())}"
