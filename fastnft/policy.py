"""The three policies of DiffusionNFT and their updates (docs/algorithm.md, section 6).

- trained: v_theta, the only one with gradients;
- old: v_old, the rollout policy, soft-updated towards the trained one after each iteration;
- ref: the base model, for the KL term (only when kl_coef > 0).

LoRA runs keep two peft adapters on one transformer, "default" (trained) and "old"; the base
with adapters disabled is the reference. Full fine-tuning keeps frozen copies of the transformer
for the old policy (and the reference, only when kl_coef > 0). Both keep an fp32 EMA of the
trained weights, used for evaluation and exports.
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fastnft.config import Config, LoraConfig
from fastnft.distributed import shard_fsdp2, wrap_ddp
from fastnft.models.adapter import repeated_blocks
from fastnft.quantize import keep_quantized_weights_out_of_ddp
from fastnft.schedules import soft_update

ROLES = ("trained", "old", "ref")


class Policies(ABC):
    """Gives the module to call for each role, and owns the old-policy and EMA updates."""

    transformer: nn.Module  # the trained policy's module

    def __init__(self) -> None:
        self.grad_module = self.transformer  # what the gradient forward calls: a DDP wrapper under DDP
        self._reset_ema()

    def _reset_ema(self) -> None:
        self.ema = {name: p.detach().float().clone() for name, p in self.trained_parameters().items()}

    @abstractmethod
    def distribute(self, strategy: str, device: torch.device, compute_dtype: torch.dtype) -> None:
        """Makes the policies data-parallel across the process group (dist.strategy)."""

    @abstractmethod
    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the optimizer updates, by name."""

    @abstractmethod
    def modules(self) -> list[nn.Module]:
        """Every distinct transformer module the roles use (for compile)."""

    @abstractmethod
    def old_parameters(self) -> dict[str, Tensor]:
        """The old policy's counterpart of every trained parameter, under the trained names."""

    @abstractmethod
    @contextmanager
    def role(self, name: str) -> Iterator[nn.Module]:
        """The module that computes the velocity of policy `name` (one of ROLES)."""

    @torch.no_grad()
    def update_old_policy(self, eta: float) -> None:
        """theta_old <- eta * theta_old + (1 - eta) * theta."""
        old = self.old_parameters()
        trained = self.trained_parameters()
        soft_update([old[n] for n in trained], trained.values(), eta)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        trained = self.trained_parameters()
        soft_update([self.ema[n] for n in trained], trained.values(), decay)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """The trained weights, the old policy and the EMA (tensors alias the live ones, so a
        checkpoint loads in place)."""
        return {
            "trained": {name: p.detach() for name, p in self.trained_parameters().items()},
            "old": {name: p.detach() for name, p in self.old_parameters().items()},
            "ema": self.ema,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for group, live in self.state_dict().items():
            for name, tensor in live.items():
                if state[group][name] is not tensor:
                    tensor.copy_(state[group][name])

    @contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """The trained module with the EMA weights swapped in (for evaluation and export)."""
        trained = self.trained_parameters()
        saved = {name: p.detach().clone() for name, p in trained.items()}
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(self.ema[name])
        try:
            with self.role("trained") as module:
                yield module
        finally:
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(saved[name])


class LoraPolicies(Policies):
    """Adapters "default" (trained) and "old" on one transformer; disabled adapters = reference."""

    def __init__(self, transformer: nn.Module, config: LoraConfig, targets: list[str]) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.transformer = transformer
        transformer.requires_grad_(False)
        init = "gaussian" if config.init == "gaussian" else True
        for adapter in ("default", "old"):
            peft_config = PeftLoraConfig(
                r=config.rank, lora_alpha=config.alpha, init_lora_weights=init, target_modules=targets
            )
            with warnings.catch_warnings():  # two adapters on one model are the design
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # a torchao-quantized base (model.quantize int8, fp8): peft could merge only with
                # transformers' quantizer at hand; fastnft never merges into the frozen base
                warnings.filterwarnings("ignore", message=".*instantiated without `get_apply_tensor_subclass`")
                try:
                    transformer.add_adapter(peft_config, adapter_name=adapter)
                except ValueError as error:  # peft's refusal: no layer matched, or one it cannot adapt
                    raise ValueError(f"lora.target_modules: {targets}: {error}") from None
        for name, parameter in transformer.named_parameters():
            if ".lora_" in name:
                parameter.data = parameter.data.float()  # adapters train in fp32 over bf16 base weights
        self._find_adapters()
        if not self._trained or self._trained.keys() != self._old.keys():
            raise ValueError(f"lora.target_modules: {targets} matched no layer of the transformer")
        # Switching roles touches only these layers: the model-level peft calls walk every module
        # (and read package metadata) three times per training pair.
        self._lora_layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        with torch.no_grad():
            for name, parameter in self._trained.items():
                self._old[name].copy_(parameter)
        self._active = None
        self._activate("trained")
        super().__init__()

    def _find_adapters(self) -> None:
        """The trained ("default") and old adapter weights, both under the trained names."""
        self._trained, self._old = {}, {}
        for name, parameter in self.transformer.named_parameters():
            if ".default." in name:
                self._trained[name] = parameter
            elif ".old." in name:
                self._old[name.replace(".old.", ".default.")] = parameter

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return self._trained

    def old_parameters(self) -> dict[str, Tensor]:
        return self._old

    def modules(self) -> list[nn.Module]:
        return [self.transformer]

    def distribute(self, strategy: str, device: torch.device, compute_dtype: torch.dtype) -> None:
        """ddp: DDP over the "default" adapter (the base and the "old" adapter are frozen, so DDP
        never sees them). fsdp2: the base and both adapters sharded per block, so a big base fits
        few GPUs; the trained adapter's gradients are reduced, the old-adapter and EMA updates
        stay shard-local."""
        self._activate("trained")
        if strategy == "ddp":
            keep_quantized_weights_out_of_ddp(self.transformer)  # a model.quantize base
            self.grad_module = wrap_ddp(self.transformer, device)
            return
        shard_fsdp2(self.transformer, repeated_blocks(self.transformer), compute_dtype)
        self._find_adapters()  # fully_shard replaced every parameter by a sharded one
        self._reset_ema()

    def _activate(self, role: str) -> None:
        if role == self._active:
            return
        # The layers' own state, set directly: peft's set_adapter and enable_adapters would also
        # toggle requires_grad on every adapter weight, which _activate manages itself.
        adapter = "default" if role == "trained" else "old"
        for layer in self._lora_layers:
            layer._disable_adapters = role == "ref"
            layer._active_adapter = adapter
        # peft marks the active adapter trainable: only "default" ever is.
        for parameter in self._old.values():
            parameter.requires_grad_(False)
        for parameter in self._trained.values():
            parameter.requires_grad_(True)
        self._active = role

    @contextmanager
    def role(self, name: str) -> Iterator[nn.Module]:
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; known: {ROLES}")
        self._activate(name)
        try:
            yield self.transformer
        finally:
            self._activate("trained")

    @contextmanager
    def old_then_reference(self) -> Iterator[nn.Module]:
        """For nft.batch_old_ref (LoRA only; the config refuses it otherwise): one module whose
        forward on 2n rows computes the old policy on the first n and the reference (the base
        alone) on the last n, exactly: the "old" adapter's contribution is zeroed on those rows,
        and a DiT forward treats the rows of a batch independently."""

        def first_half_only(module, args, output):
            output[output.shape[0] // 2 :] = 0
            return output

        hooks = [layer.lora_B["old"].register_forward_hook(first_half_only) for layer in self._lora_layers]
        try:
            with self.role("old") as module:
                yield module
        finally:
            for hook in hooks:
                hook.remove()


class FullPolicies(Policies):
    """Full fine-tuning: frozen copies for the old policy and, when kl_coef > 0, the reference."""

    def __init__(
        self,
        transformer: nn.Module,
        *,
        keep_reference: bool,
        frozen_dtype: torch.dtype,
        trained_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.transformer = transformer
        self.old = copy.deepcopy(transformer).requires_grad_(False).to(frozen_dtype)
        self.reference = copy.deepcopy(transformer).requires_grad_(False).to(frozen_dtype) if keep_reference else None
        self.transformer.to(trained_dtype).requires_grad_(True)
        self._old_by_name = dict(self.old.named_parameters())
        super().__init__()

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.transformer.named_parameters())

    def old_parameters(self) -> dict[str, Tensor]:
        return self._old_by_name

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.transformer, self.old, self.reference) if m is not None]

    def distribute(self, strategy: str, device: torch.device, compute_dtype: torch.dtype) -> None:
        """ddp: replicated copies, DDP over the trained one. fsdp2: every copy sharded per block
        the same way, so the old-policy and EMA updates are shard-local."""
        if strategy == "ddp":
            self.grad_module = wrap_ddp(self.transformer, device)
            return
        for module in self.modules():
            shard_fsdp2(module, repeated_blocks(module), compute_dtype)
        self._old_by_name = dict(self.old.named_parameters())
        self._reset_ema()

    @contextmanager
    def role(self, name: str) -> Iterator[nn.Module]:
        if name == "trained":
            yield self.transformer
        elif name == "old":
            yield self.old
        elif name == "ref":
            if self.reference is None:
                raise ValueError("the reference policy is kept only when nft.kl_coef > 0")
            yield self.reference
        else:
            raise ValueError(f"unknown role {name!r}; known: {ROLES}")


def build_policies(config: Config, transformer: nn.Module, default_lora_targets: tuple[str, ...]) -> Policies:
    """LoRA adapters on the transformer (optionally warm-started from model.init_lora), or
    frozen copies for full fine-tuning (frozen in the run's frozen-weight dtype)."""
    if config.lora.enabled:
        policies = LoraPolicies(transformer, config.lora, config.lora.target_modules or list(default_lora_targets))
        if config.model.init_lora:
            load_lora_into(policies, config.model.init_lora)
        return policies
    # bf16 trained weights only with stochastic rounding: round-to-nearest would drop every update
    # below bf16's resolution (about 0.4 % of a weight), most of them at lr 3e-4.
    trained_dtype = torch.bfloat16 if config.optim.bf16_stochastic_round else torch.float32
    return FullPolicies(
        transformer,
        keep_reference=config.nft.kl_coef > 0,
        frozen_dtype=frozen_weight_dtype(config),
        trained_dtype=trained_dtype,
    )


def frozen_weight_dtype(config: Config) -> torch.dtype:
    """Frozen weights: bf16 for precision bf16 (on any device), else fp32 (the reference
    precision adds fp16 autocast on GPU)."""
    return torch.bfloat16 if config.model.precision == "bf16" else torch.float32


def load_lora_into(policies: LoraPolicies, path: str) -> None:
    """Warm start: copies a LoRA safetensors file (diffusers or peft names) into both adapters
    and the EMA."""
    from safetensors.torch import load_file

    state = load_file(path)
    trained = policies.trained_parameters()
    loaded = 0
    for key, tensor in state.items():
        name = key.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.default.weight")
        name = name.replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in trained:
            continue
        if trained[name].shape != tensor.shape:
            raise ValueError(
                f"model.init_lora: {key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(trained[name].shape)} (lora.rank differs?)"
            )
        with torch.no_grad():
            trained[name].copy_(tensor)
            policies.old_parameters()[name].copy_(tensor)
            policies.ema[name].copy_(tensor)
        loaded += 1
    if loaded == 0:
        raise ValueError(f"model.init_lora: {path} holds no LoRA weight for lora.target_modules")
