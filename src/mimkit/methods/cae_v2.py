"""CAE v2 — Context Autoencoder with CLIP Latent Alignment (Zhang et al., TMLR 2023), after
Atten4Vis/CAE ``models/modeling_cae.py`` with ``model_type='caev2'``.

CAE's encoder and latent regressor are kept; the DALL-E decoder and the alignment branch are dropped.
A frozen teacher (CLIP's image tower in the paper; any local model here) supervises the student's
per-token outputs with a cosine loss, on the cls, the visible and the predicted masked tokens.

One step, shapes for B images, L patches, n visible, m masked, student width d, teacher width Dt::

    x     = color_jitter(x)                        training only: one jittered image for both sides
    plan  = block_mask(B, L)                       m = 30/49/98 of 196 for Tiny/Small/Base (size_preset)
    T     = l2n(teacher(x))                        (B, 1+L, Dt) frozen, eval mode, no grad; its patch
                                                   grid resampled to the student's when they differ
    T     = [T_cls ; T[ids_v] ; T[ids_m]]          (B, 1+n+m, Dt)
    z     = proj(F(x[ids_v]))                      (B, 1+n, d)   visible + cls
    z_m   = H(mask_token, kv=[z[:, 1:]; queries])  (B, m, d)     no final LN in v2
    Y     = l2n(Linear(LN([z_cls ; z_v ; z_m])))   (B, 1+n+m, Dt) one LN shared by the three groups
    loss  = mean over the supervised tokens of (1 - <Y, T>)    supervise ⊆ {cls, visible, masked}

Both sides are in the token order ``[cls, visible (ids_v order), masked (ids_m order)]``.

The teacher (:class:`~mimkit.targets.FrozenTeacher`) is read from ``teacher_path`` (a mimkit checkpoint
or export, a timm ViT state dict, an official MAE file; :meth:`FrozenTeacher.from_file`). Its weights
are part of this method's state dict together with its shape (``get_extra_state``), so evaluation,
pictures and resuming need no teacher file: a model built from a config whose teacher file is missing
gets the teacher from the checkpoint it loads; only a training step without one fails, naming the
command that makes the file. ``teacher_path: null`` with ``teacher_random_init: true`` builds a randomly
initialised frozen teacher of shape ``teacher_vit`` — a plumbing test only (it teaches nothing).

Colour jitter (``color_jitter``, 0.4 by default): the official pipeline (Atten4Vis/CAE
``furnace/datasets.py``, ``DataAugmentationForCAE``; the CAE v2 scripts ``project/CAEv2/scripts/caev2_*_300e.sh``
pass ``--color_jitter 0.4``) applies ``torchvision.transforms.ColorJitter(0.4, 0.4, 0.4)`` to every image
(probability 1; brightness, contrast and saturation factors each uniform in [0.6, 1.4], in a random order;
hue 0) in its ``common_transform``, before the flip and the crop that both views (student and CLIP) are
rendered from: the student and the teacher see the same jittered image. Here it runs in :meth:`CAEv2.forward`
in training mode, on the device and batched (:func:`color_jitter`: torchvision's tensor formulas with
per-image factors and order), in pixel space (``data_mean``/``data_std`` undo the data's normalisation),
before the teacher and the student read the images. Deviations: it acts on the crop the data pipeline made
(the official jitters the whole image first, so its contrast mean is the whole image's grey mean, not the
crop's), in float (the official on 8-bit PIL images).

Deviations (recorded): teacher patch features are resampled bilinearly when the grids differ (the
paper's grids coincide); a teacher at another image size or channel count gets the images resized
(bicubic) / grey channels repeated; ``teacher_mean``/``teacher_std`` re-normalise the input for a
teacher trained with other statistics (CLIP's), given the data's ``data_mean``/``data_std``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mimkit.errors import ConfigError
from mimkit.masking import MaskingOptions, MaskPlan, build_mask_generator
from mimkit.methods.base import (
    Capabilities,
    Method,
    MethodOptions,
    ModelConfig,
    PictureData,
    Progress,
    StepOutput,
    draw_plan,
)
from mimkit.methods.cae import (
    MASKING_KINDS,
    cae_init,
    cae_masking,
    check_masking,
    encoder_projection,
    regressor_picture_data,
)
from mimkit.nn.cae import CAEv2Head, LatentRegressor
from mimkit.nn.clip import teacher_encoder_from_spec
from mimkit.nn.vit import ViTConfig, ViTEncoder, gather_tokens
from mimkit.targets import FrozenTeacher, TokenDropper

GROUPS = ("cls", "visible", "masked")
# masked patches of 196 by model size (CAE v2 scripts: Tiny 30, Small 49, Base 98)
SIZE_MASKED = {"tiny": 30, "small": 49, "base": 98}
SIZE_BY_WIDTH = {192: "tiny", 384: "small", 768: "base"}
SIZE_PRESETS = ("auto", "tiny", "small", "base", "none")
TEACHER_COMMAND = ("mimkit pretrain configs/mae_fashion_mnist.yaml train.out_dir=runs/cae_v2_teacher "
                   "(then method.teacher_path=runs/cae_v2_teacher/checkpoint.pt)")


@dataclass
class CAEv2Options(MethodOptions):
    """CAE v2 knobs (module docstring); defaults = the published ViT-B recipe where it applies.

    * ``teacher_path``: the teacher's weight file. ``teacher_random_init``: with ``teacher_path: null``,
      a random frozen teacher of shape ``teacher_vit`` (plumbing test only). ``teacher_vit``: the
      teacher's shape when no file gives it (random init; a placeholder while a file is missing).
      ``teacher_norm``: apply the teacher's final LayerNorm (CLIP: ``ln_post``).
    * ``data_mean``/``data_std``: the data's normalisation (``data.mean``/``data.std``), needed by the
      colour jitter and the teacher re-normalisation; ``teacher_mean``/``teacher_std``: re-normalise the
      teacher's input (they need ``data_mean``/``data_std``).
    * ``color_jitter``: strength ``s`` of the official ``ColorJitter(s, s, s)`` (brightness, contrast,
      saturation; hue 0), applied to every training image before both the teacher and the student
      (module docstring); 0.4 in the official CAE v2 scripts; 0 turns it off.
    * ``supervise``: the supervised token groups, any of ``cls``, ``visible``, ``masked`` (all three in
      the paper; the slides' ``Y_v only`` / ``Y_m only`` rows restrict it).
    * ``size_preset``: the masked count by model size, 30 / 49 / 98 of 196 patches for ``tiny`` /
      ``small`` / ``base`` (scaled to other grids: ``round(L * count / 196)``); ``auto`` picks it from the
      encoder width (192 / 384 / 768; other widths use ``masking``); ``none`` uses ``masking``.
    * ``regressor_depth``: 1 / 1 / 4 for Tiny / Small / Base; its width and heads are
      ``model.decoder.embed_dim`` / ``num_heads`` (``model.decoder.depth`` is not used: the head has no blocks).
    * ``layer_scale``: LayerScale init of the regressor blocks (0.1).
    * ``teacher_drop_after`` / ``teacher_drop_keep`` / ``teacher_drop_mode``: PCAE's progressive token
      dropping inside the teacher (not in CAE v2: a composition the shared parts allow). The teacher
      runs on the whole image and after each listed block (0-based) keeps ``int(n * keep)`` of its ``n``
      patch tokens (``similarity``: the least similar to the mean token, PCAE's rule; ``random``);
      only the positions it kept to the end are supervised (the cls token always). Empty
      ``teacher_drop_after`` (the default) is CAE v2. Needs a mimkit ViT teacher on the student's grid.
    """

    name: str = "cae_v2"
    teacher_path: str | None = None
    teacher_random_init: bool = False
    teacher_vit: ViTConfig | None = None
    teacher_norm: bool = True
    data_mean: tuple[float, ...] | None = None
    data_std: tuple[float, ...] | None = None
    teacher_mean: tuple[float, ...] | None = None
    teacher_std: tuple[float, ...] | None = None
    color_jitter: float = 0.4
    supervise: tuple[str, ...] = GROUPS
    size_preset: str = "auto"
    regressor_depth: int = 4
    layer_scale: float | None = 0.1
    masking: MaskingOptions = field(default_factory=cae_masking)
    teacher_drop_after: tuple[int, ...] = ()
    teacher_drop_keep: float = 0.5
    teacher_drop_mode: str = "similarity"


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a per-image ``factor (B, 1, 1, 1)``: ``f x + (1 - f) other`` in [0, 1]."""
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luminance (torchvision's ``rgb_to_grayscale``; a grey image as it is)."""
    if x.shape[1] == 1:
        return x
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    return rgb_to_grayscale(x)


def jitter_params(batch: int, strength: float, device, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(factors (B, 3), order (B, 3))``: per image the brightness, contrast and saturation factors, each
    uniform in ``[max(0, 1 - s), 1 + s]``, and a random order of the three operations (0 brightness,
    1 contrast, 2 saturation), as ``ColorJitter.get_params`` draws them per image."""
    def uniform(shape):
        return torch.rand(shape, device=device) if generator is None else torch.rand(shape, device=device,
                                                                                    generator=generator)

    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = lo + (hi - lo) * uniform((batch, 3))
    order = torch.argsort(uniform((batch, 3)), dim=1)
    return factors, order


def apply_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness / contrast / saturation of images ``x (B, C, H, W)`` in [0, 1] (C = 1 or 3) with per-image
    ``factors`` and ``order`` (:func:`jitter_params`): torchvision's ``adjust_brightness`` /
    ``adjust_contrast`` / ``adjust_saturation`` formulas, batched (no loop over images; saturation leaves
    grey images as they are, as torchvision does)."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"colour jitter needs 1 or 3 channels, got {x.shape[1]}")
    b = x.shape[0]
    for k in range(3):
        op = order[:, k].view(b, 1, 1, 1)
        f = factors.gather(1, order[:, k : k + 1]).view(b, 1, 1, 1)
        grey = _grey(x)
        bright = _blend(x, 0.0, f)
        contrast = _blend(x, grey.mean(dim=(-3, -2, -1), keepdim=True), f)
        saturation = _blend(x, grey, f) if x.shape[1] == 3 else x
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, saturation))
    return x


def color_jitter(images: torch.Tensor, strength: float, mean, std,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The official ``ColorJitter(s, s, s)`` on normalised ``images (B, C, H, W)``: undo ``mean``/``std``,
    jitter each image in [0, 1] (:func:`apply_jitter`), normalise again."""
    x = images.float()
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    factors, order = jitter_params(x.shape[0], strength, x.device, generator)
    return ((apply_jitter(x * s + m, factors, order) - m) / s).to(images.dtype)


def size_num_keep(length: int, size: str) -> int:
    """Visible count for ``size`` (``tiny``/``small``/``base``) on ``length`` patches."""
    masked = max(1, round(length * SIZE_MASKED[size] / 196))
    return length - masked


def _teacher_spec(teacher: FrozenTeacher | None) -> dict | None:
    if teacher is None:
        return None
    enc = teacher.encoder
    if isinstance(enc, ViTEncoder):
        return {"kind": "vit", "config": asdict(enc.cfg)}
    spec = getattr(enc, "teacher_spec", None)
    if spec is None:
        raise TypeError(f"cannot describe a {type(enc).__name__} teacher for the checkpoint")
    return spec()


def _teacher_from_spec(spec: dict, norm: bool) -> FrozenTeacher:
    if spec["kind"] == "vit":
        return FrozenTeacher(ViTEncoder(ViTConfig(**spec["config"])), norm=norm)
    return FrozenTeacher(teacher_encoder_from_spec(spec), norm=norm)


def _teacher_dim(teacher: FrozenTeacher) -> int:
    return int(getattr(teacher.encoder, "out_dim", None) or teacher.encoder.embed_dim)


class CAEv2(Method):
    """``encoder`` F, ``proj``, ``regressor`` H (no final LN), ``head`` (:class:`~mimkit.nn.cae.CAEv2Head`)
    and the frozen ``teacher`` (:class:`~mimkit.targets.FrozenTeacher`)."""

    options_class = CAEv2Options
    # no teacher file offline: a random frozen teacher (plumbing only; it teaches nothing) of the preset's
    # shape, and for smoke runs a tiny one (3 channels: grey images are repeated; any size: resized)
    offline_overrides = ("method.teacher_path=null", "method.teacher_random_init=true")
    smoke_overrides = (
        "method.teacher_vit.img_size=28", "method.teacher_vit.patch_size=4", "method.teacher_vit.in_chans=3",
        "method.teacher_vit.embed_dim=16", "method.teacher_vit.depth=1", "method.teacher_vit.num_heads=2",
    )

    def __init__(self, model: ModelConfig | None = None, options: CAEv2Options | None = None):
        super().__init__()
        model = model or ModelConfig()
        o = self.options = options or CAEv2Options()
        bad = [g for g in o.supervise if g not in GROUPS]
        if bad or not o.supervise:
            raise ValueError(f"method.supervise must be a non-empty subset of {list(GROUPS)}, got {list(o.supervise)}")
        if o.size_preset not in SIZE_PRESETS:
            raise ValueError(f"unknown method.size_preset {o.size_preset!r}; choose one of: {', '.join(SIZE_PRESETS)}")
        if (o.data_mean is None) != (o.data_std is None) or (o.teacher_mean is None) != (o.teacher_std is None):
            raise ValueError("give method.data_mean with data_std, and method.teacher_mean with teacher_std")
        if o.teacher_mean is not None and o.data_mean is None:
            raise ValueError("re-normalising the teacher input (method.teacher_mean/teacher_std) needs the data's "
                             "normalisation in method.data_mean/data_std")
        if o.color_jitter < 0:
            raise ValueError(f"method.color_jitter must be >= 0 (0 = off), got {o.color_jitter}")
        if o.teacher_drop_after:
            TokenDropper(o.teacher_drop_after, o.teacher_drop_keep, o.teacher_drop_mode)  # checks keep and mode
        self.encoder = enc = ViTEncoder(model.encoder)
        size = SIZE_BY_WIDTH.get(enc.embed_dim, "none") if o.size_preset == "auto" else o.size_preset
        self.size = size
        num_keep = o.masking.num_keep
        if size != "none":
            if o.masking.num_keep is not None:
                raise ValueError(f"method.size_preset={o.size_preset} sets the masked count; set "
                                 "method.size_preset=none to use method.masking.num_keep")
            num_keep = size_num_keep(enc.num_patches, size)
        check_masking(o.masking, enc.num_patches, "cae_v2", num_keep)
        mask_opts = MaskingOptions(**{**o.masking.__dict__, "num_keep": num_keep})
        self.masking = build_mask_generator(mask_opts)
        d = model.decoder
        self.proj = encoder_projection(enc.embed_dim, d.embed_dim, model.encoder.norm_eps)
        self.regressor = LatentRegressor(d.embed_dim, enc.grid_size, o.regressor_depth, d.num_heads, d.mlp_ratio,
                                         model.encoder.drop_path_rate, o.layer_scale, final_norm=False)
        self._width = d.embed_dim
        self._data_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # set_input_normalisation
        teacher, self._teacher_ready = self._initial_teacher()
        self.head = CAEv2Head(d.embed_dim, _teacher_dim(teacher)) if teacher is not None else None
        cae_init(self, enc, [self.regressor.mask_token])  # before the teacher joins: it keeps its weights
        self.teacher = teacher
        self.register_load_state_dict_post_hook(CAEv2._after_load)

    # -- the teacher ----------------------------------------------------------------------------
    def _initial_teacher(self) -> tuple[FrozenTeacher | None, bool]:
        """(teacher, ready): from the file when it exists; random when allowed; else a placeholder of
        shape ``teacher_vit`` (or none) that a checkpoint fills."""
        o = self.options
        if o.teacher_path is None:
            if not o.teacher_random_init:
                raise ValueError("method.teacher_path is not set: give a teacher file (e.g. "
                                 f"{TEACHER_COMMAND}), or teacher_random_init=true (plumbing test only)")
            if o.teacher_vit is None:
                raise ValueError("method.teacher_random_init needs method.teacher_vit (the teacher's ViT shape)")
            return FrozenTeacher(ViTEncoder(o.teacher_vit), norm=o.teacher_norm), True
        if o.teacher_random_init:
            raise ValueError("method.teacher_random_init=true needs method.teacher_path=null")
        if Path(o.teacher_path).is_file():
            return FrozenTeacher.from_file(o.teacher_path, norm=o.teacher_norm), True
        placeholder = FrozenTeacher(ViTEncoder(o.teacher_vit), norm=o.teacher_norm) if o.teacher_vit else None
        return placeholder, False

    def _require_teacher(self) -> FrozenTeacher:
        if not self._teacher_ready:
            raise ConfigError(f"teacher file {self.options.teacher_path} not found; make it with: {TEACHER_COMMAND}")
        return self.teacher

    def get_extra_state(self) -> dict:
        """The teacher's shape, so a checkpoint rebuilds it without the teacher file."""
        return {"teacher": _teacher_spec(self.teacher)}

    def set_extra_state(self, state: dict) -> None:
        spec = state.get("teacher")
        if spec is None or spec == _teacher_spec(self.teacher):
            return
        device = self.encoder.cls_token.device
        self.teacher = _teacher_from_spec(spec, self.options.teacher_norm).to(device)
        dim = _teacher_dim(self.teacher)
        if self.head is None or self.head.head.out_features != dim:
            self.head = CAEv2Head(self._width, dim).to(device)

    @staticmethod
    def _after_load(module, incompatible) -> None:
        if module.teacher is not None and not any(k.startswith("teacher.") for k in incompatible.missing_keys):
            module._teacher_ready = True

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """The images as the teacher expects them: re-normalised, channel count and size adapted."""
        o = self.options
        x = images.float()
        if o.teacher_mean is not None:
            def col(v):
                return torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)

            x = (x * col(o.data_std) + col(o.data_mean) - col(o.teacher_mean)) / col(o.teacher_std)
        enc = self.teacher.encoder
        c = enc.in_chans
        if c != x.shape[1] and x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        size = (int(enc.grid_size[0] * enc.patch_size), int(enc.grid_size[1] * enc.patch_size))
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor, ids_v: torch.Tensor, ids_m: torch.Tensor) -> torch.Tensor:
        """``(B, 1+n+m, Dt)`` unit vectors ``[T_cls ; T[ids_v] ; T[ids_m]]`` on the student's grid (with
        teacher token dropping: zero vectors at the positions the teacher dropped)."""
        teacher = self._require_teacher()
        if self.options.teacher_drop_after:
            t, _ = self._dropping_teacher(images)
        else:
            t = F.normalize(teacher(self.teacher_input(images), grid=self.encoder.grid_size).float(), dim=-1)
        patches = t[:, 1:]
        return torch.cat([t[:, :1], gather_tokens(patches, ids_v), gather_tokens(patches, ids_m)], dim=1)

    @torch.no_grad()
    def _dropping_teacher(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher with PCAE's token dropping (``teacher_drop_*``): ``(B, 1+L, Dt)`` unit vectors, zero at
        dropped positions, and ``(B, L)`` bool, the positions kept to the end."""
        o, enc = self.options, self.teacher.encoder
        if not isinstance(enc, ViTEncoder) or tuple(enc.grid_size) != tuple(self.encoder.grid_size):
            raise ConfigError("method.teacher_drop_after needs a mimkit ViT teacher on the student's patch grid "
                              f"({self.encoder.grid_size[0]}x{self.encoder.grid_size[1]}); drop teacher_drop_after "
                              "or use such a teacher")
        x = enc.patch_tokens(self.teacher_input(images))
        b, length = x.shape[:2]
        ids = torch.arange(length, device=x.device).expand(b, -1)
        dropper = TokenDropper(o.teacher_drop_after, o.teacher_drop_keep, o.teacher_drop_mode, num_prefix=1)
        out = enc.run_blocks(enc.with_cls(x), ids=ids, select=dropper)
        y = F.normalize((enc.norm(out.x) if self.teacher.norm else out.x).float(), dim=-1)
        full = y.new_zeros(b, 1 + length, y.shape[-1])
        full[:, 0] = y[:, 0]
        full[:, 1:].scatter_(1, out.ids[..., None].expand(-1, -1, y.shape[-1]), y[:, 1:])
        kept = torch.zeros(b, length, dtype=torch.bool, device=x.device).scatter_(1, out.ids, True)
        return full, kept

    def jitter(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The official colour jitter (``color_jitter``; module docstring) on normalised training images,
        un-normalised with ``method.data_mean/data_std`` or else the data's normalisation the trainer
        gives (:meth:`set_input_normalisation`)."""
        o = self.options
        mean, std = (o.data_mean, o.data_std) if o.data_mean is not None else self._data_norm or (None, None)
        if mean is None:
            raise ConfigError(f"method.color_jitter={o.color_jitter} jitters in pixel space and needs the data's "
                              "normalisation: set method.data_mean/data_std (= data.mean/data.std), or "
                              "method.color_jitter=0")
        return color_jitter(images, o.color_jitter, mean, std, generator)

    def set_input_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self._data_norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def preflight(self, fresh: bool) -> None:
        if fresh and not self._teacher_ready:  # a checkpoint would bring the teacher; a fresh run needs the file
            self._require_teacher()

    # -- capabilities and masking ---------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        # without masked-token supervision the regressor gets no gradient (DDP must be told)
        unused = "masked" not in self.options.supervise
        return Capabilities(pictures=("regressor", "views"), find_unused_parameters=unused, masking_kinds=MASKING_KINDS)

    def make_plan(self, images: torch.Tensor, progress: Progress | None = None,
                  generator: torch.Generator | None = None) -> MaskPlan:
        """Block-wise (or random) mask with the size preset's count in every image."""
        return draw_plan(self.masking, self.encoder, images, progress, generator)

    # -- step -----------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """``Y (B, 1+n+m, Dt)`` unit vectors in the order ``[cls, visible, masked]``."""
        if plan.num_views != 1 or plan.keep_valid is not None:
            raise ValueError("cae_v2 takes one view per image with the same masked count in every image")
        ids_v, ids_m = plan.ids_keep, plan.ids_masked()
        z = self.proj(self.encoder.forward_masked(images, ids_v))  # (B, 1+n, d)
        z_m = self.regressor(z[:, 1:], ids_v, ids_m)  # (B, m, d)
        return self.head(torch.cat([z, z_m], dim=1))

    def token_weights(self, n: int, m: int, device) -> torch.Tensor:
        """``(1+n+m,)`` 1 for the supervised groups, 0 elsewhere."""
        sel = self.options.supervise
        parts = [torch.full((k,), float(g in sel), device=device) for g, k in zip(GROUPS, (1, n, m))]
        return torch.cat(parts)

    def forward(self, images: torch.Tensor, progress: Progress | None = None, *, plan: MaskPlan | None = None,
                generator: torch.Generator | None = None) -> StepOutput:
        """``images (B, C, H, W)`` -> :class:`StepOutput` with ``pred``/``target`` ``(B, 1+n+m, Dt)``."""
        if plan is None:
            plan = self.make_plan(images, progress, generator)
        if self.training and self.options.color_jitter > 0:
            images = self.jitter(images, generator)  # one jittered image for the teacher and the student
        ids_v, ids_m = plan.ids_keep, plan.ids_masked()
        if self.options.teacher_drop_after:  # one teacher pass gives the targets and what it kept
            t, kept = self._dropping_teacher(images)
            target = torch.cat([t[:, :1], gather_tokens(t[:, 1:], ids_v), gather_tokens(t[:, 1:], ids_m)], dim=1)
            keep_w = torch.cat([kept.new_ones(kept.shape[0], 1), torch.gather(kept, 1, ids_v),
                                torch.gather(kept, 1, ids_m)], dim=1).float()
        else:
            target, keep_w = self.teacher_targets(images, ids_v, ids_m), None
        pred = self.predict(images, plan)
        cos = (pred * target).sum(-1)  # (B, 1+n+m)
        n = plan.num_keep
        w = self.token_weights(n, cos.shape[1] - 1 - n, cos.device)
        if keep_w is None:
            loss = ((1 - cos) * w).sum() / (w.sum() * cos.shape[0])
        else:  # mean over the supervised tokens the teacher kept
            ww = w * keep_w
            loss = ((1 - cos) * ww).sum() / ww.sum().clamp_min(1.0)
        c = cos.detach()
        if keep_w is None:
            vis, msk = c[:, 1 : 1 + n].mean(), c[:, 1 + n :].mean()
        else:  # over the tokens the teacher kept
            vis, msk = ((c * keep_w)[:, s].sum() / keep_w[:, s].sum().clamp_min(1.0)
                        for s in (slice(1, 1 + n), slice(1 + n, None)))
        metrics = {"loss_cos": loss.detach(), "cos_cls": c[:, 0].mean(), "cos_visible": vis, "cos_masked": msk,
                   "mask_ratio": plan.mask.mean().detach()}
        if keep_w is not None:
            metrics["teacher_kept"] = keep_w[:, 1:].mean().detach()
        return StepOutput(loss, metrics, pred=pred, target=target, plan=plan)

    @torch.no_grad()
    def alignment_map(self, images: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """``(B, L)``: ``cos(Y_m, T_m)`` at the masked patches (prediction vs teacher), NaN at visible ones."""
        ids_m = plan.ids_masked()
        cos = (self.predict(images, plan) * self.teacher_targets(images, plan.ids_keep, ids_m)).sum(-1)
        out = torch.full(plan.mask.shape, float("nan"), device=images.device)
        return out.scatter_(1, ids_m, cos[:, 1 + plan.num_keep :])

    def picture_data(self, kind: str, images: torch.Tensor,
                     generator: torch.Generator | None = None) -> PictureData:
        """``regressor``: :func:`~mimkit.methods.cae.regressor_picture_data`; the rest as the base class."""
        if kind == "regressor":
            return regressor_picture_data(self, images, generator)
        return super().picture_data(kind, images, generator)
