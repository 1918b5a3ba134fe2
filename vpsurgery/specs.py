"""Model specs: the strings the CLI accepts for MODEL, and how they become an ``nn.Module``.

Three forms, each with optional ``:key=value,...`` keyword arguments for the builder::

    vpsurgery:resnet20:width=0.5       a reference network of vpsurgery.models
    torchvision:resnet18:num_classes=10 a torchvision.models builder
    mypackage.nets:build_net:depth=3   any importable factory (function or class)

Values are parsed as int, float, bool (true/false), None, or left as strings.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

SPEC_FORMS = ("vpsurgery:NAME", "torchvision:NAME", "package.module:factory")
SPEC_HELP = (
    "vpsurgery:NAME, torchvision:NAME or package.module:factory, optionally followed by "
    ":key=value,... builder arguments (e.g. torchvision:resnet18:num_classes=10,width_mult=0.5)"
)


class SpecError(ValueError):
    """A model spec that cannot be parsed or built; the message says what to change."""


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip()


def parse_kwargs(text: str) -> dict[str, Any]:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SpecError(f"builder argument {item!r} is not key=value; write e.g. :num_classes=10,width=0.5")
        kwargs[key.strip()] = parse_value(value)
    return kwargs


@dataclass(frozen=True)
class ModelSpec:
    source: str  # "vpsurgery", "torchvision" or the module path of a user factory
    name: str  # model / factory name
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.source}:{self.name}" + (f":{args}" if args else "")

    @property
    def registry(self) -> bool:
        return self.source == "vpsurgery"

    def factory(self) -> Callable[..., nn.Module]:
        return _resolve(self)

    def accepts(self, argument: str, *, through_var_kwargs: bool = False) -> bool:
        """Whether the builder names ``argument`` (or, with ``through_var_kwargs``, takes **kwargs;
        torchvision builders pass those on to the model class, which takes num_classes)."""
        try:
            params = inspect.signature(self.factory()).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.name == argument or (through_var_kwargs and p.kind is inspect.Parameter.VAR_KEYWORD)
                   for p in params)

    def build_kwargs(self, **defaults: Any) -> dict[str, Any]:
        """The builder arguments: the spec's own, plus those of ``defaults`` (e.g. num_classes of
        the dataset) that the spec does not set and the builder accepts."""
        kwargs = {k: v for k, v in defaults.items()
                  if k not in self.kwargs and self.accepts(k, through_var_kwargs=k == "num_classes")}
        kwargs.update(self.kwargs)
        return kwargs

    def build(self, **defaults: Any) -> nn.Module:
        """Build the model with :meth:`build_kwargs`."""
        kwargs = self.build_kwargs(**defaults)
        factory = self.factory()
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise SpecError(f"cannot build {self}: {exc}; check the builder arguments after the last ':'") from exc
        except (ValueError, KeyError, RuntimeError) as exc:
            raise SpecError(f"cannot build {self}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise SpecError(f"{self} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def to_json(self) -> dict[str, Any]:
        return {"spec": str(self), "source": self.source, "name": self.name, "kwargs": dict(self.kwargs)}


def parse_spec(text: str) -> ModelSpec:
    """Parse a MODEL spec string (see the module docstring); the builder is checked to exist."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SpecError(f"model spec {text!r} is not of the form {' / '.join(SPEC_FORMS)}[:key=value,...]")
    spec = ModelSpec(parts[0].strip(), parts[1].strip(), parse_kwargs(parts[2]) if len(parts) == 3 else {})
    _resolve(spec)
    return spec


def _resolve(spec: ModelSpec) -> Callable[..., nn.Module]:
    if spec.source == "vpsurgery":
        from vpsurgery.models import MODELS

        if spec.name not in MODELS:
            raise SpecError(f"unknown vpsurgery model {spec.name!r}; choose one of: {', '.join(MODELS)}")
        return MODELS[spec.name].builder
    if spec.source == "torchvision":
        return _torchvision_builder(spec.name)
    return _user_factory(spec.source, spec.name)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    from torchvision import models

    try:
        return models.get_model_builder(name)
    except ValueError:
        raise SpecError(f"unknown torchvision model {name!r}; see torchvision.models.list_models() for the names") from None


def _user_factory(module_name: str, attribute: str) -> Callable[..., nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SpecError(
            f"cannot import module {module_name!r} ({exc}); make it importable (install it or add its folder to "
            f"PYTHONPATH), or use {' / '.join(SPEC_FORMS[:2])}"
        ) from exc
    except Exception as exc:  # the user's module failed while importing
        raise SpecError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if factory is None:
        raise SpecError(f"module {module_name!r} has no attribute {attribute!r}; name a function or class that builds the model")
    if not callable(factory):
        raise SpecError(f"{module_name}:{attribute} is a {type(factory).__name__}, not a callable that builds the model")
    return factory


def spec_from_json(data: dict[str, Any]) -> ModelSpec:
    """Inverse of :meth:`ModelSpec.to_json` (as stored in report.json)."""
    return ModelSpec(data["source"], data["name"], dict(data.get("kwargs", {})))
