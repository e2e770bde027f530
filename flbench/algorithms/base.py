"""The one interface a prompt-learning method implements, and the registry that finds methods by name.

A method is an `nn.Module` holding only its trainable parts; the frozen backbone is shared, never copied. It never
imports Flower: what travels to the server is `shared_state()`, what stays with a client is `local_state()`, and
the FL layer moves those dictionaries around.

The forward pass is split in two so that the frozen half can be cached: `encode(images)` is the image side (pure
function of the frozen backbone when `frozen_image_side` is True) and `logits(encoded)` the trainable side.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.prompting import handcrafted_text_features
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError, unknown_keys_message
from flbench.registry import Registry

Encoded = Any  # a tensor, or a tuple of tensors for methods that also need patch features

METHODS: Registry[type["PromptMethod"]] = Registry("methods", "algorithm.name")
# Constructor arguments the experiment passes itself: never config keys.
NOT_HYPERPARAMETERS = ("self", "backbone", "classnames", "templates")


class PromptMethod(nn.Module):
    name: ClassVar[str]
    # True when encode() depends on no trainable parameter: image features may then be computed once and reused.
    frozen_image_side: ClassVar[bool] = True
    # True for methods that prompt the image tower's transformer blocks (VPT, MaPLe, PromptSRC): ViT towers only.
    needs_vit: ClassVar[bool] = False
    # For docs/methods.md (`python -m flbench.methods_doc`): the paper, and the loss terms beyond cross-entropy.
    paper: ClassVar[str] = ""
    extra_loss: ClassVar[str] = ""
    # For docs/methods.md's "Fidelity" section: the reference read (paper, repository, file) and every remaining
    # deliberate deviation from it, with the reason.
    fidelity: ClassVar[str] = ""
    # True when backward() multiplies the loss by `loss_scale` (fp16 training's loss scaling, flbench.engine).
    # Methods that compute their own gradients (ProGrad's projection, DP-FPL's clipping) set False: fp16 is refused.
    loss_scaling: ClassVar[bool] = True
    # Autocast precision of forward passes (fp32 | bf16 | fp16), set by the experiment from the `precision` key.
    precision: str = "fp32"
    loss_scale: torch.Tensor | None = None  # fp16 only: the GradScaler's current scale, set by flbench.engine

    @classmethod
    def hyperparameters(cls) -> list[str]:
        """The hyper-parameters the method declares: keyword arguments of the `__init__`s along its MRO (a subclass
        forwards the rest to its parent through `**hparams`; PromptMethod refuses whatever is left)."""
        names: dict[str, None] = {}
        for klass in cls.__mro__:
            if klass is PromptMethod or "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__dict__["__init__"]).parameters.values():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in NOT_HYPERPARAMETERS:
                    names.setdefault(p.name, None)
        return list(names)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            METHODS.register(cls.name, cls)

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 **hparams: Any) -> None:
        super().__init__()
        if hparams:  # every hyper-parameter is a keyword some __init__ of the class declares (hyperparameters())
            raise ConfigError(unknown_keys_message("algorithm", sorted(hparams), type(self).hyperparameters()))
        # Stored outside the module tree: the backbone is shared and frozen, so it is no part of this method's state.
        object.__setattr__(self, "backbone", backbone)
        self.classnames = list(classnames)
        self.templates = list(templates)

    # --- forward --------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Encoded:
        """Image-side features. Default: the frozen CLIP image embedding."""
        with torch.no_grad():
            return self.backbone.encode_image(images)

    def logits(self, encoded: Encoded) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode(images))

    @property
    def device(self) -> torch.device:
        """The backbone's device: a method's parameters and buffers live where its backbone does (the CPU for a
        method without one, such as a test's toy model)."""
        return getattr(self.backbone, "device", None) or torch.device("cpu")

    def loss(self, encoded: Encoded, labels: torch.Tensor) -> torch.Tensor:
        """Training loss: cross-entropy plus the method's own terms."""
        return F.cross_entropy(self.logits(encoded), labels)

    def backward(self, encoded: Encoded, labels: torch.Tensor) -> torch.Tensor:
        """Compute the loss and leave gradients in `.grad`. Methods that edit gradients (ProGrad) override this."""
        loss = self.loss(encoded, labels)
        backward_outside_autocast(loss if self.loss_scale is None else loss * self.loss_scale)
        return loss.detach()

    # --- cohort training (flbench.engine.train_cohort; flbench.algorithms.cohort) --------------------------------
    # True when `cohort_backward` trains K clients in one step. Methods that do not stack train one client at a time.
    stacks: ClassVar[bool] = False

    def cohort_backward(self, states: Sequence[Any], encoded: Sequence[Encoded], labels: Sequence[torch.Tensor]
                        ) -> list[torch.Tensor]:
        """One training step of K > 1 clients (`cohort.ClientState`s: each client's leaves and buffers) with the
        text tower run once on their stacked prompts; gradients land in each client's leaves' `.grad`, exactly as
        `backward` would give them client by client (up to floating-point reassociation). Returns the per-client
        detached losses. Only for `stacks = True`."""
        raise NotImplementedError(f"{self.name} does not stack its state (PromptMethod.stacks is False)")

    # --- what travels --------------------------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """State-dict keys sent to the server. Default: every trainable parameter (plain FedAvg of the prompt)."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Copies on the CPU, whatever the device: they go into Flower records (and the server's history)."""
        state = self.state_dict()
        return {k: state[k].detach().to("cpu", copy=True) for k in self.shared_keys()}

    def local_state(self) -> dict[str, torch.Tensor]:
        """Everything else the client must keep between rounds (personal prompts, method buffers), on the CPU."""
        shared = set(self.shared_keys())
        return {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items() if k not in shared}

    def load_partial(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        unknown = set(state) - set(own)
        if unknown:
            raise KeyError(f"{self.name}: state has keys this method does not own: {sorted(unknown)[:5]}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(torch.as_tensor(value))

    def reported_state(self, history: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Server side: the shared state to evaluate, given every aggregated state so far (oldest first).

        Default: the latest aggregate. PromptSRC overrides this with its Gaussian average over rounds; the
        training prompt that goes back to the clients is never replaced by it.
        """
        return dict(history[-1])

    def reset_walk(self) -> None:
        """Start over any state that advances with training steps outside the state dict (ProDA's walk through its
        prompts). `Experiment.fresh()` calls it with the state-dict reset, so no client's local training continues
        the walk of the client trained before it in the same process — which a resumed run or a Ray worker would
        not repeat."""

    # --- class names -----------------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Switch to other class names (base→novel, cross-dataset). Methods with per-class parameters refuse."""
        self.classnames = list(classnames)

    def keep_handcrafted(self, templates: Sequence[str]) -> None:
        """(Re)set the buffer `handcrafted` [C, D]: zero-shot text features of the current class names under
        `templates` (a fixed target or classifier: zero-shot, VPT, KgCoOp, ProGrad, FedPGP, PromptSRC). Call it from
        `set_classnames`; the features are encoded once per process and class list, and are no part of the state."""
        self.register_buffer("handcrafted", handcrafted_text_features(self.backbone, self.classnames, templates),
                             persistent=False)

    def extra_metrics(self, training: Mapping[str, Any]) -> dict[str, Any]:
        """Method-specific figures for the run record's `method` section (e.g. DP-FPL's privacy budget).

        `training` describes what ran: num_rounds, epochs, batch_size, client_sizes, clients_per_round.
        """
        return {}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def shared_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shared_state().values())


def backward_outside_autocast(loss: torch.Tensor) -> None:
    """`loss.backward()`, with autocast switched off as PyTorch recommends (the backward ops still run in the
    dtypes autocast chose for their forward ops)."""
    if torch.is_autocast_enabled(loss.device.type):
        with torch.autocast(loss.device.type, enabled=False):
            loss.backward()
    else:
        loss.backward()


def cosine_logits(backbone: FrozenCLIP, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP logits: scaled cosine similarity between images [B, D] and classes [C, D]."""
    return backbone.logit_scale * normalize(image_features) @ normalize(text_features).t()


def _import_all() -> None:
    import flbench.algorithms as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"flbench.algorithms.{info.name}")


METHODS.on_miss(_import_all)


def method_class(name: str) -> type[PromptMethod]:
    """The method class `algorithm.name` names: a built-in, an entry point, or a module:Class path."""
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, PromptMethod)):
        raise ConfigError(f"algorithm.name={name!r} is {cls!r}, not a PromptMethod subclass")
    return cls


def available_methods() -> list[str]:
    return METHODS.names()


def build_method(name: str, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str],
                 hparams: Mapping[str, Any]) -> PromptMethod:
    return method_class(name)(backbone, classnames, templates, **dict(hparams))
