"""A closed, explicit name -> object registry (Caffe's layer factory, Keras' `get(identifier)`)."""
import difflib
import inspect

from dlcli.errors import ConfigError


def did_you_mean(name: str, known) -> str:
    known = [k for k in known if isinstance(k, str)]  # a malformed config may hold lists or numbers as names
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
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

    def create(self, identifier, extra=()):
        """An instance from a name ('adam') or a {type: name, **args} mapping. A wrong argument name is a
        ConfigError listing the accepted ones: the constructor's, plus `extra` ones it passes on through **kw."""
        if isinstance(identifier, dict):
            if "type" not in identifier:
                raise ConfigError(f"a {self.kind} mapping needs a 'type' key (the {self.kind} name); got {identifier}")
            name, args = identifier["type"], {k: v for k, v in identifier.items() if k != "type"}
        elif isinstance(identifier, str):
            name, args = identifier, {}
        else:
            raise ConfigError(f"a {self.kind} is a name or a {{type: name, ...}} mapping; got {identifier!r}")
        cls = self.get(name)
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kw", "kwargs")]
        params += [p for p in extra if p not in params]
        unknown = [k for k in args if k not in params]
        if unknown:
            raise ConfigError(f"{self.kind} '{cls.__name__}' has no argument '{unknown[0]}'"
                              f"{did_you_mean(unknown[0], params)}; accepted: {', '.join(params) or 'none'}")
        return cls(**args)

    def unknown_message(self, name) -> str:
        return f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {', '.join(self.names())}"
