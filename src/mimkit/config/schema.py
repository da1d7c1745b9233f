"""The config's sections as typed dataclasses (``model`` and ``method`` come from :mod:`mimkit.methods`)
and the allowed values of its string settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.methods import METHODS, MethodOptions, ModelConfig


@dataclass
class DataConfig:
    """Training data. ``dataset``: ``fashion_mnist`` or a path to an image folder (class sub-folders
    optional). ``in_memory``: keep the whole uint8 set on the device and augment there (batched);
    otherwise a DataLoader with ``num_workers`` processes. ``batch_size`` is per process. A directory
    written by ``mimkit data prepare`` (tar shards) is streamed (``in_memory: false``) through a
    shuffle buffer of ``shuffle_buffer`` samples, resuming mid-epoch at the exact sample.
    ``follow_links``: symbolic links in image folders are skipped (and counted) unless true; when
    followed, only links that stay inside the folder are, each real folder once (no loops)."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    eval_dataset: str | None = None
    eval_root: str | None = None
    batch_size: int = 64
    augment: str = "rrc_flip"
    crop_scale: tuple[float, float] = (0.2, 1.0)
    in_memory: bool = True
    num_workers: int = 8
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    skip_corrupt: bool = False
    follow_links: bool = False
    limit: int | None = None
    shuffle_buffer: int = 4096
    decode: str = "cpu"  # image folders streamed: cpu (PIL workers), gpu (nvJPEG, mimkit.data.gpu), auto


@dataclass
class OptimConfig:
    """AdamW with MAE's grouping; ``lr = base_lr * effective_batch / 256`` unless ``lr`` is set.
    Warmup and cosine are per iteration over fractional epochs. MAE warms up from 0;
    ``warmup_from_min_lr`` starts the warmup at ``min_lr`` instead (Latent MIM's code).
    ``min_lr_ratio``: the floor as a fraction of the peak lr (Latent MIM's ``min_lr_frac`` 0.25, so it
    follows the batch-scaled lr); wins over ``min_lr``.
    ``no_decay_keywords``: parameter-name substrings exempt from weight decay besides 1-D params and
    biases (Latent MIM: ``[bias, norm, embed]``)."""

    base_lr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    min_lr_ratio: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    warmup_from_min_lr: bool = False
    no_decay_keywords: tuple[str, ...] = ()
    accum_iter: int = 1
    clip_grad: float | None = None
    fused: bool | None = None


@dataclass
class TrainConfig:
    """Loop settings. ``keep_checkpoints``: besides the latest ``checkpoint.pt``, keep this many
    step-numbered copies ``checkpoint-<step>.pt`` (-1 = all; for accuracy-vs-epoch reports; a corrupt
    latest checkpoint falls back to the newest good copy). ``precision``: ``auto`` (bf16 on GPU, fp32
    on CPU), ``fp32``, ``bf16`` (also on CPUs with bf16 instructions), ``fp16`` (GPU, with a grad
    scaler). ``ckpt_every_minutes``: also save when this much wall time passed since the last save
    (``null`` = steps only). ``resume_changes``: ``refuse`` (default) stops a resume whose config
    changes the optimisation (lr, schedule, batch, world size, masking, seed, data); ``allow``
    resumes and records the changes in ``metrics.jsonl``. ``resume_older``: ``refuse`` (default) stops an
    explicit ``train.resume=<checkpoint>`` whose step is older than a checkpoint already in ``out_dir``
    (training on from it would overwrite the newer progress); ``allow`` goes back to it. ``max_nonfinite``: skipped (non-finite)
    steps after which the run stops; ``max_nonfinite_fraction``: a run whose share of skipped steps
    is above this fails at its end. ``dist_timeout_minutes``: how long a rank waits for the others
    in a collective before failing (torchrun). ``strategy``: ``ddp`` (default: replicated model,
    single-file ``checkpoint.pt``) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state
    sharded over the processes; DCP checkpoint directories ``dcp/step-<step>`` that resume on any
    number of processes, plus ``encoder.safetensors`` at the end). ``activation_checkpointing``:
    recompute each transformer block's activations in the backward pass (any method, either
    strategy; same numbers, less memory, about one more forward pass). ``compile``: ``auto`` (default:
    compiled on a GPU for runs of 1000 steps or more), ``true``, ``false``. ``compile_mode``: the
    ``torch.compile`` mode when compiled: ``default``, ``reduce-overhead`` (the step's kernels replayed
    as CUDA graphs on a GPU: fewer host launches, for small models whose step is launch-bound),
    ``max-autotune`` (kernel autotuning plus CUDA graphs), ``max-autotune-no-cudagraphs``. The CUDA-graph
    modes are opt-in and need ``optim.accum_iter=1`` and one process (each step is marked as a new graph
    iteration, whose replay reuses the previous step's output memory; with micro-batches or DDP/FSDP
    that has not been tested, so it is refused); graphs with dynamic inputs (SBAM's lengths, the step
    that Latent MIM's and PCAE's forward read) run without CUDA graphs
    (:func:`mimkit.train.precision.compile_kwargs`)."""

    epochs: float = 800.0
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool | str = "auto"
    compile_mode: str = "default"
    out_dir: str = "runs/mae"
    ckpt_every_steps: int = 1000
    keep_checkpoints: int = 0
    log_every_steps: int = 20
    resume: str = "auto"
    max_nonfinite: int = 20
    max_nonfinite_fraction: float = 0.1
    num_threads: int | None = None
    progress_bar: bool = True
    tensorboard: bool = True
    ckpt_every_minutes: float | None = None
    resume_changes: str = "refuse"
    resume_older: str = "refuse"
    dist_timeout_minutes: float = 30.0
    strategy: str = "ddp"
    activation_checkpointing: bool = False


@dataclass
class EvalConfig:
    """Evaluation during/after pretraining: kNN every ``knn_every_epochs`` (0 = only at the end)."""

    knn_at_end: bool = True
    knn_every_epochs: float = 0.0
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_limit: int | None = None
    knn_test_limit: int | None = None
    picture_at_end: bool = True
    batch_size: int = 512


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodOptions = field(default_factory=lambda: METHODS["mae"].options_class())
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("rrc_flip", "flip", "none")
RESUME_CHANGES = ("refuse", "allow")
STRATEGIES = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
"""``train.compile_mode`` values under which torch.compile replays the step as CUDA graphs (on a GPU)."""
MAX_SEED = 2**32 - 1
"""Largest ``train.seed``: ``numpy.random.seed`` takes ``[0, 2**32)`` (the loop seeds numpy with
``(seed + rank [+ step]) % 2**32``, torch and ``random`` with the sum itself)."""
