"""Latent, text-conditional diffusion: a local Stable-Diffusion-shaped diffusers folder, optionally with LoRA weights.

The folder (a downloaded `StableDiffusionPipeline`, the shipped tiny one, or a `train-lora` checkpoint) holds
`model_index.json`, `unet/` (UNet2DConditionModel), `vae/` (AutoencoderKL), `text_encoder/` (CLIPTextModel),
`tokenizer/` (CLIPTokenizer) and `scheduler/`; nothing is ever downloaded (`local_files_only`). Optionally:
- `lora/`: LoRA weights for the UNet's attention projections, in peft format (`adapter_config.json` +
  `adapter_model.safetensors`) or diffusers format (`pytorch_lora_weights.safetensors`);
- `prompts.json`: the prompt of every training and validation image of the finetuning set (its class through a
  template such as "a {class} painting"), written by `train-lora`, so `condition("train/17")` needs no dataset.

As the adapter sees it (D-TRAK's SD-LoRA setting, METHODS.md 2.9):
- `encode` = the VAE's latent distribution mode x scaling factor (no sampling); `decode` the inverse;
- `condition(keys)` = the text encoder's last hidden states of each key's prompt: a training or validation image's
  from `prompts.json`, a generated or uploaded image's from its key ("gen/3/p=a cat painting");
- `trainable_parameters` = the LoRA weights only (the base UNet, VAE and text encoder stay frozen); a folder
  without LoRA attributes every UNet parameter.

A `train-lora` checkpoint does not copy the base pipeline: its component folders are relative symbolic links to the
base folder's, beside its own `lora/` and `prompts.json` (`save`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError, DatasetError
from ..fileio import atomic_dir
from .adapter import Condition, DiffusionModel, key_prompt, sample_side, use_classic_attention
from .checkpoint import CheckpointInfo, resolve_checkpoint
from .schedules import Schedule, load_schedule

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "tokenizer": "CLIPTokenizer", "scheduler": "a scheduler"}
LORA_DIR, PROMPTS_FILE = "lora", "prompts.json"
PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", \
    "pytorch_lora_weights.safetensors"
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # every attention projection, as diffusers' LoRA scripts


@dataclass
class PromptTable:
    """The prompt of each image of a finetuning set: `template` with the image's class name.

    Attributes:
        template: e.g. "a {class} painting" (underscores in class names become spaces, as D-TRAK's captions).
        dataset: the dataset spec the labels come from.
        classes: class names by label.
        labels: per split ("train", "val"), the label of every image in split order (-1: unknown).
    """

    template: str
    dataset: str
    classes: list[str]
    labels: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        check_template(self.template)

    def prompt(self, split: str, index: int) -> str:
        labels = self.labels.get(split)
        if labels is None or not 0 <= index < len(labels):
            raise ConfigError(f"no prompt for {split} image {index}: the finetuning set {self.dataset} has "
                              f"{len(labels or [])} {split} images")
        name = _names(self.classes, [labels[index]])[0]
        return self.template.replace("{class}", name.replace("_", " "))

    def class_names_of(self, split: str) -> list[str]:
        """The class name of every image of a split, in order ("" where unknown): what its prompts depend on."""
        return _names(self.classes, self.labels.get(split) or [])

    def class_prompts(self) -> dict[str, str]:
        return {c: self.template.replace("{class}", c.replace("_", " ")) for c in self.classes}


def prompt_table(load, dataset: str, template: str, resolution: int, channels: int) -> PromptTable:
    """Every training and validation image's prompt: its class name through `template` (`load(split, resolution,
    channels)` reads a split; a folder dataset without a validation split has train prompts only)."""
    train_set = load("train", resolution, channels)
    labels = {"train": train_set.labels.tolist()}
    try:
        labels["val"] = load("val", resolution, channels).labels.tolist()
    except DatasetError:
        pass
    return PromptTable(template, dataset, list(train_set.class_names), labels)


def _names(classes: Sequence[str], labels: Sequence[int]) -> list[str]:
    return [classes[lab] if 0 <= lab < len(classes) else "" for lab in labels]


def check_template(template: str) -> None:
    if "{class}" not in template:
        raise ConfigError(f"the prompt template {template!r} has no {{class}} placeholder, e.g. 'a {{class}} painting'")


def check_components(folder: Path) -> None:
    """One CheckpointError naming the first component a Stable Diffusion folder lacks."""
    for name, what in COMPONENTS.items():
        if not (folder / name).is_dir():
            raise CheckpointError(f"{folder} is not a complete Stable Diffusion folder: {name}/ ({what}) is missing")


def _safetensors_or_none(folder: Path) -> bool | None:
    """use_safetensors for from_pretrained: True when the folder has safetensors weights; otherwise the libraries
    read .bin files with torch.load(weights_only=True)."""
    return True if any(folder.glob("*.safetensors")) else None


def _load_component(folder: Path, name: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: diffusers takes seconds to import
    from transformers import CLIPTextModel, CLIPTokenizer

    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer}
    path = folder / name
    try:
        if name == "tokenizer":
            return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        dtype = {"dtype" if name == "text_encoder" else "torch_dtype": torch.float32}  # transformers 5 / diffusers
        return loaders[name].from_pretrained(str(path), local_files_only=True,
                                             use_safetensors=_safetensors_or_none(path), **dtype)
    except Exception as exc:  # a missing file, a config for another class, weights of another shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} could not be loaded as a {COMPONENTS[name]} ({first[:200]})") from None


# -- LoRA ----------------------------------------------------------------------------------------------------------


def attach_lora(unet, rank: int, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS) -> None:
    """Add a fresh LoRA adapter (peft; B = 0, so the model is unchanged) to the UNet's attention projections."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"the LoRA rank must be at least 1, got {rank}")
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                                init_lora_weights="gaussian", target_modules=list(targets)))


def _read_lora(lora_dir: Path) -> tuple[dict[str, torch.Tensor], int, float | None, list[str]]:
    """(peft-keyed state dict, rank, alpha or None, target module names) from a peft or diffusers LoRA folder."""
    def read(path):
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None

    if (lora_dir / PEFT_WEIGHTS).is_file():
        state = read(lora_dir / PEFT_WEIGHTS)
        cfg = json.loads((lora_dir / PEFT_CONFIG).read_text()) if (lora_dir / PEFT_CONFIG).is_file() else {}
    elif (lora_dir / DIFFUSERS_WEIGHTS).is_file():
        from diffusers.utils import convert_unet_state_dict_to_peft

        raw = read(lora_dir / DIFFUSERS_WEIGHTS)
        if any(k.startswith("text_encoder") for k in raw):
            raise CheckpointError(f"{lora_dir / DIFFUSERS_WEIGHTS} also adapts the text encoder; only UNet LoRA "
                                  "weights are supported")
        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in raw.items()})
        cfg = {}
    else:
        raise CheckpointError(f"{lora_dir} holds no LoRA weights ({PEFT_WEIGHTS} or {DIFFUSERS_WEIGHTS})")
    state = {k.replace(".default.", "."): v for k, v in state.items() if ".alpha" not in k}
    downs = [v for k, v in state.items() if "lora_A" in k]
    if not downs:
        raise CheckpointError(f"{lora_dir}: no lora_A weights found; is this a LoRA for a UNet?")
    rank = int(cfg.get("r") or downs[0].shape[0])
    targets = cfg.get("target_modules") or sorted({_module_suffix(k) for k in state})
    if isinstance(targets, str):
        targets = [targets]
    return state, rank, cfg.get("lora_alpha"), list(targets)


def _module_suffix(key: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight' -> 'to_out.0'."""
    module = key.split(".lora_")[0]
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def load_lora(unet, lora_dir: Path) -> int:
    """Attach the LoRA weights in `lora_dir` to the UNet; a CheckpointError (one line) when they were made for a
    UNet of another shape or for another rank. Returns the rank."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state, rank, alpha, targets = _read_lora(lora_dir)
    try:
        attach_lora(unet, rank, alpha, targets)
    except ValueError as exc:  # peft: no module matches the targets
        raise CheckpointError(f"LoRA weights in {lora_dir} do not fit this UNet ({exc})") from None
    expected = get_peft_model_state_dict(unet)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"LoRA weights in {lora_dir} do not fit this UNet: {len(missing)} missing and "
                              f"{len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"LoRA weights in {lora_dir} do not fit this UNet (another shape or rank): {k} is "
                                  f"{tuple(v.shape)}, rank {rank} on this UNet needs {tuple(expected[k].shape)}")
    set_peft_model_state_dict(unet, {k: v.float() for k, v in state.items()})
    return rank


# -- the model -----------------------------------------------------------------------------------------------------


def read_prompt_table(path: Path) -> PromptTable | None:
    """A checkpoint's prompt table (None when the folder has none); one CheckpointError line when unreadable."""
    if not path.is_file():
        return None
    try:
        return PromptTable(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a prompt table ({exc})") from None


class PromptKeys:
    """The prompt a text-conditional model conditions a noise key on: the key's own ("gen/3/p=a cat"), else a
    training or validation image's from the model's `prompts` table (a mixin of `DiffusionModel`s with one)."""

    prompts: PromptTable | None
    missing_table = "attribute a checkpoint made by train-lora, which records one"  # what to do without a table

    def prompt_for(self, key: str) -> str:
        text = key_prompt(key)
        kind, _, rest = key.partition("/")
        if text is not None:
            if not text.strip():
                raise ConfigError(f"{self.spec} is text-conditional: the prompt is empty; give one (--prompt)")
            return text
        if kind in ("train", "val"):
            if self.prompts is None:
                raise ConfigError(f"{self.spec} has no prompt table ({PROMPTS_FILE}) for its training images; "
                                  f"{self.missing_table}")
            return self.prompts.prompt(kind, int(rest.split("/")[0]))
        raise ConfigError(f"{self.spec} is text-conditional: give a prompt for {kind} images (--prompt)")

    def class_prompts(self) -> list[str]:
        return list(self.prompts.class_prompts().values()) if self.prompts is not None else []

    def condition(self, keys: Sequence[str]) -> Condition:
        return self.prompt_condition([self.prompt_for(k) for k in keys])


class LatentSD(PromptKeys, DiffusionModel):
    """A Stable-Diffusion-shaped latent, text-conditional model (see the module docstring).

    `trainable=False` (attribution, sampling): everything frozen, eval mode, classic attention (vmap). With
    `trainable=True` (LoRA finetuning) the LoRA weights get gradients, the rest stays frozen.
    """

    kind = "latent-sd"
    conditional = True

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: Schedule, info: CheckpointInfo | None,
                 device: torch.device | str = "cpu", base_dir: Path | None = None,
                 prompts: PromptTable | None = None, lora_rank: int | None = None, trainable: bool = False):
        super().__init__(schedule, info, device)
        self.base_dir = base_dir
        self.prompts = prompts
        self.lora_rank = lora_rank
        self.notes: list[str] = []
        self._embeddings: dict[str, torch.Tensor] = {}
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        unet.requires_grad_(False)
        if trainable:
            for name, p in unet.named_parameters():
                p.requires_grad_("lora_" in name)
            self.unet = unet.to(self.device).train()
        else:
            use_classic_attention(unet)
            self.unet = unet.to(self.device).eval()

    # -- loading and saving --

    @classmethod
    def accepts(cls, info: CheckpointInfo) -> bool:
        return (info.pipeline_class() in PIPELINE_CLASSES
                or info.unet_config().get("_class_name") == "UNet2DConditionModel")

    @classmethod
    def load(cls, info: CheckpointInfo, device: str | torch.device = "auto", trainable: bool = False) -> LatentSD:
        folder = info.pipeline_dir
        check_components(folder)
        parts = {name: _load_component(folder, name) for name in ("unet", "vae", "text_encoder", "tokenizer")}
        rank = load_lora(parts["unet"], folder / LORA_DIR) if (folder / LORA_DIR).is_dir() else None
        prompts = read_prompt_table(folder / PROMPTS_FILE)
        schedule = load_schedule(info)
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], schedule, info, device,
                   base_dir=_base_of(folder), prompts=prompts, lora_rank=rank, trainable=trainable)

    @classmethod
    def trains(cls, cfg) -> bool:
        return cfg.pipeline is not None

    @classmethod
    def for_training(cls, cfg, load, device):
        """The pipeline with a fresh LoRA adapter of `cfg.rank`; every training and validation image's prompt is its
        class name through `cfg.prompt_template` (the model's prompt table)."""
        model = cls.for_finetuning(cfg.pipeline, cfg.rank, device)
        if cfg.resolution is not None and cfg.resolution != model.resolution:
            raise ConfigError(f"{cfg.pipeline} generates {model.resolution}px images; drop --resolution or give "
                              f"{model.resolution}")
        model.prompts = prompt_table(load, cfg.dataset, cfg.prompt_template, model.resolution, model.channels)
        return model, load("train", model.resolution, model.channels)

    @classmethod
    def for_finetuning(cls, pipeline: str, rank: int, device: str | torch.device = "cpu",
                       alpha: float | None = None) -> LatentSD:
        """The pipeline (a Stable Diffusion folder, without LoRA) with a fresh LoRA adapter, trainable. Seed
        torch's global generator first: the LoRA A matrices are drawn from it."""
        info = resolve_checkpoint(pipeline)
        if not cls.accepts(info):
            raise ConfigError(f"{pipeline} is not a Stable Diffusion folder (model_index.json with a "
                              "UNet2DConditionModel); train-lora finetunes latent text-to-image pipelines")
        if (info.pipeline_dir / LORA_DIR).is_dir():
            raise ConfigError(f"{info.pipeline_dir} already has LoRA weights; finetune its base pipeline instead")
        model = cls.load(info, device, trainable=False)
        attach_lora(model.unet, rank, alpha)
        model.lora_rank = rank
        model.unet.requires_grad_(False)
        for name, p in model.unet.named_parameters():
            p.requires_grad_("lora_" in name)
        model.unet.train()
        model._identity = None
        return model

    def save(self, target: Path, extra: dict | None = None) -> None:
        """A checkpoint folder: links to the base pipeline's components, `lora/` (peft format), `prompts.json`."""
        from peft.utils import get_peft_model_state_dict

        if self.base_dir is None:
            raise ConfigError("this model was not loaded from a pipeline folder; it cannot be saved as a checkpoint")
        target = Path(target)
        with atomic_dir(target) as tmp:
            for name in (*COMPONENTS, "model_index.json"):
                os.symlink(os.path.relpath(self.base_dir / name, target), tmp / name)
            if self.lora_rank is not None:
                (tmp / LORA_DIR).mkdir()
                state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
                save_file(state, str(tmp / LORA_DIR / PEFT_WEIGHTS))
                cfg = self.unet.peft_config["default"]
                (tmp / LORA_DIR / PEFT_CONFIG).write_text(json.dumps(
                    {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
                     "peft_type": "LORA", "init_lora_weights": "gaussian"}, indent=2) + "\n")
            if self.prompts is not None:
                (tmp / PROMPTS_FILE).write_text(json.dumps(asdict(self.prompts)) + "\n")
            if extra:
                (tmp / "attribution.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")

    # -- geometry --

    @property
    def module(self) -> torch.nn.Module:
        return self.unet

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0))

    @property
    def resolution(self) -> int:
        return sample_side(self.unet.config) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return int(self.vae.config.in_channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.vae.encode(x.to(self.device)).latent_dist.mode() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.vae.decode(z.to(self.device) / self.scaling_factor).sample

    # -- parameters --

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        lora = {k: p for k, p in self.unet.named_parameters() if "lora_" in k}
        return lora or dict(self.unet.named_parameters())

    def describe_parameters(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters().values())
        if self.lora_rank is None:
            return f"all {n:,} UNet parameters (no LoRA)"
        return f"LoRA (rank {self.lora_rank}), {n:,} parameters attributed"

    def _hash_weights(self) -> str:
        import hashlib

        h = hashlib.sha256((self.info.content_hash() if self.info else "").encode())
        for k, v in sorted(self.trainable_parameters().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def check_training_set(self, train) -> None:
        """The prompt table gives each training image's prompt by index, so the set attributed must be the one it
        was recorded for: as many images, each of the same class (so of the same prompt; a spec written another
        way, e.g. its classes in another order, passes). One ConfigError line naming both sets otherwise."""
        if self.prompts is None or train.split != "train":
            return  # no table: a training image's prompt is refused in `prompt_for`, with its own line
        recorded = self.prompts.class_names_of("train")
        n = len(train)
        if n != len(recorded):
            why = f"{n} training images, the finetuning set {len(recorded)}"
        else:
            given = _names(train.class_names, [int(v) for v in train.labels])
            differ = sum(a != b for a, b in zip(recorded, given))
            if not differ:
                return
            why = f"{differ} of its {n} training images in another class than the finetuning set's"
        raise ConfigError(f"{self.spec} was finetuned on {self.prompts.dataset}, not on {train.spec} ({why}): its "
                          "prompts.json gives each training image's prompt by index, so attribute it against "
                          f"--dataset {self.prompts.dataset}")

    # -- conditions (prompt_for, class_prompts, condition: PromptKeys) --

    def prompt_condition(self, prompts: Sequence[str]) -> Condition:
        return {"encoder_hidden_states": torch.stack([self._embed(p) for p in prompts])}

    @torch.no_grad()
    def _embed(self, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden states of a prompt, (L, D), cached; a prompt longer than the tokenizer
        allows is truncated, with one warning line."""
        if prompt not in self._embeddings:
            limit = int(self.tokenizer.model_max_length)
            n = len(self.tokenizer(prompt, truncation=False).input_ids)
            if n > limit:
                kept = self.tokenizer.decode(self.tokenizer(prompt, truncation=True, max_length=limit).input_ids,
                                             skip_special_tokens=True)
                note = (f"warning: the prompt {prompt!r} has {n} tokens, more than the tokenizer's {limit}; "
                        f"truncated to {kept!r}")
                self.notes.append(note)
                print(note, file=sys.stderr)
            ids = self.tokenizer(prompt, padding="max_length", max_length=limit, truncation=True,
                                 return_tensors="pt").input_ids
            with self._lock:
                self._embeddings[prompt] = self.text_encoder(ids.to(self.device))[0][0].float()
        return self._embeddings[prompt]


def _base_of(folder: Path) -> Path:
    """The base pipeline folder: where a checkpoint's component links point, or the folder itself."""
    unet = folder / "unet"
    return unet.resolve().parent if unet.is_symlink() else folder.resolve()
