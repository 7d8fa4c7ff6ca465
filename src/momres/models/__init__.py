"""Registered models: CIFAR and ImageNet ResNets, their momentum twins, RevNet baselines.

    from momres import models
    models.list_models("mresnet*")
    net = models.create_model("mresnet56", num_classes=100, gamma=0.9)

Each momentum model ``m<name>`` is ``to_momentum`` of the plain ``<name>``: one piece of code
per architecture, and state dicts that load both ways between the twins.
"""

from . import cifar, imagenet, revnet  # noqa: F401  (registers the models)
from ._registry import create_model, list_models, model_options, register_model

__all__ = ["create_model", "list_models", "model_options", "register_model"]
