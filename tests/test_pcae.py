"""PCAE: the progressive teacher keeps exactly the least mean-similar tokens, ids follow their tokens,
keep = 1 is a plain EMA latent target, the teacher starts as a copy, counted FLOPs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fmnist, tiny_model_config

from mimkit.flops import count_flops, vit_block_flops
from mimkit.masking import MaskingOptions
from mimkit.methods import PCAE, PCAEOptions, Progress
from mimkit.methods.pcae import drop_schedule, stage_counts
from mimkit.nn.vit import gather_tokens
from mimkit.targets import LatentTarget, TokenDropper

ROOT = Path(__file__).resolve().parents[1]


def make(depth=3, **opts):
    torch.manual_seed(0)
    return PCAE(tiny_model_config(depth=depth), PCAEOptions(**opts))


def images(b=4, seed=1):
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Wraps the dropper: records (x, ids) entering each drop and the (x, ids) it returns."""

    def __init__(self, dropper):
        self.dropper, self.calls = dropper, []

    def __call__(self, i, x, ids):
        res = self.dropper(i, x, ids)
        if i in self.dropper.after_blocks:
            self.calls.append((x, ids, res if res is not None else (x, ids)))
        return res


def record(model, x, plan, generator=None):
    rec = {}

    def select(d):
        rec["r"] = Recorder(d)
        return rec["r"]

    out = model.encode_teacher(x, plan.ids_masked(), generator, select=select)
    return out, rec["r"].calls


def test_drop_schedules():
    assert drop_schedule(12, 3, 0) == (0, 4, 8)  # default
    assert drop_schedule(12, 3, 1) == (3, 7, 11)
    assert drop_schedule(12, 3, 2) == (0, 5, 11)
    assert drop_schedule(12, 3, 3) == (0, 1, 2)
    assert drop_schedule(6, 3, 0) == (0, 2, 4)  # the Fashion-MNIST preset
    assert drop_schedule(2, 3, 0) == drop_schedule(2, 3, 1) == (0, 1)  # stages capped at the depth
    assert PCAE(tiny_model_config(depth=12)).after_blocks == (0, 4, 8)
    assert stage_counts(147, 3, 0.5) == [147, 73, 36, 18]  # ViT-B/16 at 224


@pytest.mark.parametrize("opts, depth, msg", [
    (dict(keep=0.0), 3, "keep"),
    (dict(keep=1.5), 3, "keep"),
    (dict(drop="topk"), 3, "drop"),
    (dict(drop_case=7), 3, "drop_case"),
    (dict(after_blocks=(0, 5)), 3, "distinct"),
    (dict(masking=MaskingOptions(kind="sbam")), 3, "masking"),
    (dict(masking=MaskingOptions(num_keep=49)), 3, "masked"),
])
def test_bad_options_raise_at_construction(opts, depth, msg):
    with pytest.raises(ValueError, match=msg):
        PCAE(tiny_model_config(depth=depth), PCAEOptions(**opts))


def test_teacher_starts_as_exact_copy_and_follows_ema():
    torch.manual_seed(0)
    model = PCAE(tiny_model_config(depth=3, drop_path_rate=0.2), PCAEOptions(momentum=0.9))
    teacher, student = model.target.branch, model.encoder
    s_sd = student.state_dict()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, s_sd[k]), k
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.blocks[-1].drop_path1.rate == 0.0 and student.blocks[-1].drop_path1.rate == pytest.approx(0.2)
    assert all(b.drop_path1.rate == pytest.approx(0.2) for b in model.decoder.blocks)  # the code's constant rate
    old = teacher.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        student.blocks[0].attn.qkv.weight.add_(1.0)
    model.after_step(Progress(0, 10))  # momentum 0.9 at fraction 0
    expect = 0.9 * old + 0.1 * student.blocks[0].attn.qkv.weight
    assert torch.allclose(teacher.blocks[0].attn.qkv.weight, expect, atol=1e-6)


def test_kept_tokens_are_exactly_the_least_mean_similar():
    model = make(depth=4)  # drops after blocks 0, 1, 2; block 3 runs on the survivors
    x = images()
    plan = model.make_plan(x, None, torch.Generator().manual_seed(0))
    out, calls = record(model, x, plan)
    assert len(calls) == 3
    for x_in, ids_in, (x_out, ids_out) in calls:
        b, n, _ = x_in.shape
        k = int(n * 0.5)
        for s in range(b):  # reference: one sample at a time, explicit formula, Python sort
            t = x_in[s] / x_in[s].norm(dim=-1, keepdim=True)
            score = (t @ t.mean(0)).tolist()
            order = sorted(range(n), key=lambda j: score[j])[:k]
            assert ids_out[s].tolist() == [int(ids_in[s, j]) for j in order]
            assert torch.equal(x_out[s], x_in[s, order])
            kept = torch.tensor(score)[order]
            dropped = torch.tensor([score[j] for j in range(n) if j not in order])
            assert kept.max() <= dropped.min()
    # the targets are the teacher's final LN of the survivors, re-standardised per token
    t = model.target.branch
    _, ids_last, (x_last, _) = calls[-1]
    assert model.after_blocks == (0, 1, 2)
    y = t.norm(t.blocks[3](x_last))
    assert torch.allclose(out.target, F.layer_norm(y, y.shape[-1:], eps=1e-6), atol=1e-5)


@pytest.mark.parametrize("drop", ["similarity", "random"])
def test_ids_follow_their_tokens_through_every_drop(drop):
    model = make(drop=drop)
    t = model.target.branch
    with torch.no_grad():  # identity blocks: each token stays its own patch embedding
        for blk in t.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    x = images()
    plan = model.make_plan(x, None, torch.Generator().manual_seed(3))
    out, calls = record(model, x, plan, torch.Generator().manual_seed(4))
    tokens = t.patch_tokens(x)
    for _, _, (x_out, ids_out) in calls:
        assert torch.equal(x_out, gather_tokens(tokens, ids_out))
    final = t.norm(gather_tokens(tokens, out.ids))
    assert torch.allclose(out.target, F.layer_norm(final, final.shape[-1:], eps=1e-6), atol=1e-5)
    masked = plan.mask.bool()
    assert bool(torch.gather(masked, 1, out.ids).all())  # retained ids are masked ids


def test_keep_one_equals_plain_ema_latent_target_on_the_same_plan():
    model = make(keep=1.0)
    plain = LatentTarget("ema", model.encoder)  # an independent EMA target, a fresh copy of the encoder
    x = images()
    plan = model.make_plan(x, None, torch.Generator().manual_seed(0))
    out = model(x, plan=plan)
    ids_m, ids_v = plan.ids_masked(), plan.ids_keep

    def run(enc):
        h = enc.run_blocks(gather_tokens(enc.patch_tokens(x), ids_m), num_prefix=0).x
        return enc.norm(h)

    y = plain(run)
    y = F.layer_norm(y, y.shape[-1:], eps=1e-6)
    pred = model.decoder(model.encoder.forward_tokens(gather_tokens(model.encoder.patch_tokens(x), ids_v)), ids_v, ids_m)
    loss = 1 - F.cosine_similarity(pred, y, dim=-1).mean()
    assert torch.equal(out.plan.ids_target, ids_m)
    assert torch.allclose(out.target, y, atol=1e-6) and torch.allclose(out.pred, pred, atol=1e-6)
    assert torch.allclose(out.loss, loss, atol=1e-6)
    m = ids_m.shape[1]
    assert [out.metrics[f"teacher_tokens_{j}"] for j in range(4)] == [m] * 4
    assert out.metrics["teacher_flops_ratio"] == 1.0


def test_random_drop_keeps_the_right_count():
    model = make(drop="random")
    x = images(8)
    plan = model.make_plan(x, None, torch.Generator().manual_seed(0))
    a = model(x, plan=plan, generator=torch.Generator().manual_seed(5))
    b = model(x, plan=plan, generator=torch.Generator().manual_seed(5))
    c = model(x, plan=plan, generator=torch.Generator().manual_seed(6))
    assert [a.metrics[f"teacher_tokens_{j}"] for j in range(4)] == stage_counts(37, 3, 0.5) == [37, 18, 9, 4]
    ids = a.plan.ids_target
    assert ids.shape == (8, 4)
    a.plan.validate()  # distinct, masked
    assert torch.equal(ids, b.plan.ids_target) and not torch.equal(ids, c.plan.ids_target)
    sim = make()(x, plan=plan).plan.ids_target
    assert not torch.equal(ids, sim)


def test_vit_block_flop_formula_matches_flop_counter():
    from mimkit.nn.layers import Block

    blk = Block(32, 2)
    for n in (5, 37):
        assert count_flops(lambda n=n: blk(torch.randn(1, n, 32))) == vit_block_flops(n, 32, 128)


def test_step_metrics_and_counted_teacher_flops():
    model = make()
    x = images()
    plan = model.make_plan(x, None, torch.Generator().manual_seed(0))
    out = model(x, plan=plan)
    met = out.metrics
    assert [met[f"teacher_tokens_{j}"] for j in range(4)] == [37, 18, 9, 4]
    assert met["decoder_seq_len"] == 1 + 12 + 4
    counted = count_flops(lambda: model.encode_teacher(x[:1], plan.ids_masked()[:1]))
    assert met["teacher_flops"] == counted
    # analytic: patch-embedding conv on all 49 patches + each block at its input token count
    enc, d = model.encoder, 32
    per_block = [37, 18, 9]  # blocks 0, 1, 2 see 37, 18, 9 tokens (drops after 0, 1, 2)
    conv = 2 * 49 * d * 16
    assert counted == conv + sum(vit_block_flops(n, d, 4 * d) for n in per_block)
    nodrop = conv + 3 * vit_block_flops(37, d, 4 * d)
    assert met["teacher_flops_ratio"] == pytest.approx(counted / nodrop)
    model(x)
    assert len(model.flops) == 2  # counted once per signature (drop, no-drop), then cached
    assert enc is model.encoder


def test_block_masking_gradients_and_plan():
    model = make(masking=MaskingOptions(kind="block", ratio=0.75))
    x = images()
    out = model(x, Progress(3, 10), generator=torch.Generator().manual_seed(0))
    out.plan.validate()
    assert out.plan.ids_target.shape == (4, 4)
    out.loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.decoder.mask_token.grad is not None
    assert all(p.grad is None for p in model.target.branch.parameters())
    assert out.metrics["ema_momentum"] > model.options.momentum
    # the loss, rebuilt from this step's plan: the teacher's standardised targets at the retained ids, the
    # student's decoder queried at those ids, and 1 - cos per token averaged by hand in float64
    plan = out.plan
    with torch.no_grad():
        teacher = model.encode_teacher(x, plan.ids_masked())
        assert torch.equal(teacher.ids, plan.ids_target)
        enc = model.encoder
        pred = model.decoder(enc.forward_tokens(gather_tokens(enc.patch_tokens(x), plan.ids_keep)), plan.ids_keep,
                             teacher.ids)
    torch.testing.assert_close(out.pred.detach(), pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.target, teacher.target, rtol=0, atol=1e-6)
    p, t = pred.double(), teacher.target.double()
    assert torch.allclose(t.mean(-1), torch.zeros(4, 4, dtype=t.dtype), atol=1e-5)  # per-token standardised
    assert torch.allclose(t.pow(2).mean(-1), torch.ones(4, 4, dtype=t.dtype), atol=1e-3)
    cos = [float((p[b, k] @ t[b, k]) / (p[b, k].norm() * t[b, k].norm())) for b in range(4) for k in range(4)]
    assert float(out.loss.detach()) == pytest.approx(1 - sum(cos) / len(cos), abs=1e-6)
    # and it is 0 exactly when the prediction is (a positive multiple of) the target
    model.decoder.forward = lambda *a, **k: 3.0 * model.encode_teacher(x, plan.ids_masked()).target
    assert float(model(x, plan=plan).loss) == pytest.approx(0.0, abs=1e-6)


def test_pictures(tmp_path):
    from mimkit.viz import draw_picture

    model = make()
    assert model.capabilities.pictures == ("teacher_drops", "views")
    imgs = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
    for kind in model.capabilities.pictures:
        p = draw_picture(kind, model, imgs, [0.286], [0.353], tmp_path / f"{kind}.png")
        assert p.stat().st_size > 1000


def test_dropper_counts_when_keep_is_one():
    d = TokenDropper([0, 1], keep=1.0)
    assert d(0, torch.randn(2, 6, 4), None) is None and d.counts == [6]


# --------------------------------------------------------------------------------------------------
# EMA timing: after every micro-batch (the official loop) or once per optimizer step


STEPS = 3


def _micro_batches(n_steps, k, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 28, 28, generator=g), None) for _ in range(n_steps * k)]


def _trainer_accumulation(model, k, steps=STEPS):
    """The trainer's step: :class:`~mimkit.train.step.Accumulator` (forward, backward, ``after_micro_batch``
    per micro-batch), AdamW step, ``after_step`` with the progress after it. Returns the logged losses and
    the momentum of every teacher update, in order."""
    from mimkit.train.distributed import DistInfo
    from mimkit.train.precision import Precision
    from mimkit.train.step import Accumulator

    fractions = []
    update = model.target.update

    def spy(progress, fraction=None):
        fractions.append(fraction)
        return update(progress, fraction)

    model.target.update = spy
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    acc = Accumulator(iter(_micro_batches(steps, k)), k, DistInfo(), (4, 1, 28, 28), Precision("fp32", torch.device("cpu")),
                      lambda: False, model.after_micro_batch)
    losses = []
    torch.manual_seed(11)  # the masks
    for s in range(steps):
        out = acc(model, Progress(s, steps, micro_batches=k))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(Progress(s + 1, steps, micro_batches=k))
        losses.append(out.loss)
    return losses, fractions


def _hand_loop(model, k, momentum_at, steps=STEPS):
    """A loop written out as the official engine_pretrain.py: per iteration ``it`` forward, ``loss / k``
    backward, the optimizer step on every k-th iteration, then ``momentum_at(it)`` (``None``: no update)."""
    from mimkit.targets import ema_update

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    torch.manual_seed(11)
    batches = _micro_batches(steps, k)
    for it, (x, _) in enumerate(batches):
        s, j = divmod(it, k)
        if j == 0:
            total = torch.zeros(())
        out = model(x, Progress(s, steps))
        (out.loss / k).backward()
        total += out.loss.detach() / k
        if j == k - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
        m = momentum_at(it)
        if m is not None:
            ema_update(model.target.branch, model.encoder, m)
    return losses


def test_ema_per_micro_batch_equals_the_official_loop_under_accumulation():
    """Default ``ema_update=micro_batch``, accumulation 2: the trainer's hooks give exactly (bitwise) the
    official loop: the teacher is updated after each micro-batch, at the momentum of iteration ``it``
    (``it / (steps * 2)`` of the cosine), so the second micro-batch's teacher forward sees the teacher
    updated after the first, and the step's last update follows the optimizer step."""
    from mimkit.targets import cosine_momentum

    base = make(momentum=0.9)
    hand = make(momentum=0.9)
    hand.load_state_dict(base.state_dict())
    losses, fractions = _trainer_accumulation(base, 2)
    assert fractions == [it / (2 * STEPS) for it in range(2 * STEPS)]  # two updates a step, by iteration
    expect = _hand_loop(hand, 2, lambda it: cosine_momentum(0.9, it / (2 * STEPS), 1.0))
    assert all(torch.equal(a, b) for a, b in zip(losses, expect, strict=True)), (losses, expect)
    for (name, a), b in zip(base.state_dict().items(), hand.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # and it is not the once-per-step rule: from the same start, the teacher there moves less
    start = make(momentum=0.9).target.branch.state_dict()
    step = make(momentum=0.9, ema_update="step")
    _trainer_accumulation(step, 2)
    for n, t in base.target.branch.state_dict().items():
        if n.endswith("qkv.weight"):
            moved, moved_step = (t - start[n]).norm(), (step.target.branch.state_dict()[n] - start[n]).norm()
            assert moved > 1.5 * moved_step, (n, moved, moved_step)


def test_ema_per_step_option_is_the_earlier_rule():
    """``ema_update=step``: one teacher update per optimizer step, from ``after_step``, at the progress after
    the step (``(s + 1) / steps``), the micro-batches in between leaving the teacher alone: mimkit's
    earlier PCAE, bitwise."""
    from mimkit.targets import cosine_momentum

    base = make(momentum=0.9, ema_update="step")
    hand = make(momentum=0.9, ema_update="step")
    losses, fractions = _trainer_accumulation(base, 2)
    assert fractions == [None] * STEPS  # update(progress): the momentum at the progress after the step
    expect = _hand_loop(hand, 2, lambda it: cosine_momentum(0.9, (it // 2 + 1) / STEPS, 1.0) if it % 2 else None)
    assert all(torch.equal(a, b) for a, b in zip(losses, expect, strict=True))
    for (name, a), b in zip(base.state_dict().items(), hand.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_without_accumulation_after_step_alone_gives_the_official_rule():
    """A loop that never calls ``after_micro_batch`` (no accumulation, e.g. the golden hand loop): the default
    updates once per step from ``after_step`` at the momentum of iteration ``s`` (the base momentum first);
    ``step`` at ``(s + 1) / steps``."""
    fractions = {}
    for rule in ("micro_batch", "step"):
        m = make(momentum=0.9, ema_update=rule)
        seen = fractions[rule] = []
        m.target.momentum.at = lambda f, _at=m.target.momentum.at, _seen=seen: _seen.append(f) or _at(f)
        for s in range(4):
            m.after_micro_batch(Progress(s, 4))  # k = 1: nothing between micro-batches
            m.after_step(Progress(s + 1, 4))
    assert fractions["micro_batch"] == [0.0, 0.25, 0.5, 0.75]
    assert fractions["step"] == [0.25, 0.5, 0.75, 1.0]


def test_guard_undoes_micro_batch_updates_of_a_skipped_step():
    """The trainer's :class:`~mimkit.train.step.AfterStepGuard` copies the teacher before the micro-batches
    (``begin``) of a method that changes it there: a skipped step gets the step-boundary teacher back, on
    the device path (``bad`` flag) and on the host path (``restore``); a good step keeps the updates."""
    from mimkit.train.step import AfterStepGuard

    model = make(momentum=0.5)
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.weight.add_(1.0)  # the student moves away: an EMA step changes the teacher
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    guard = AfterStepGuard(model, opt)
    assert guard.active and guard.micro
    teacher = model.target.branch.blocks[0].attn.qkv.weight
    start = teacher.clone()
    prog = Progress(0, 10, micro_batches=2)
    for bad, kept in ((torch.tensor(1.0), False), (None, True)):
        guard.begin()
        model.after_micro_batch(Progress(0, 10, micro_batch=0, micro_batches=2))
        assert not torch.equal(teacher, start)
        guard(Progress(1, 10, micro_batches=2), bad)
        assert torch.equal(teacher, start) != kept
        with torch.no_grad():
            teacher.copy_(start)
    guard.begin()
    model.after_micro_batch(prog)
    guard.restore()
    assert torch.equal(teacher, start)


@needs_fmnist
@pytest.mark.parametrize("fused", ["true", "false"])
def test_trainer_skipped_step_leaves_the_per_micro_batch_teacher_unchanged(tmp_path, fused):
    """Through the Trainer with accumulation 2: a non-finite step (the first micro-batch of step 1 poisoned)
    leaves the teacher as it was before that step, although ``after_micro_batch`` moved it in between, on
    the device path (fused AdamW) and on the host path; the good steps move it."""
    from conftest import TINY_RUN

    from mimkit.config import load_config
    from mimkit.train import Trainer
    from mimkit.train.distributed import unwrap

    cfg = load_config(ROOT / "configs/pcae_fashion_mnist.yaml",
                      [*TINY_RUN, "data.batch_size=8", "optim.accum_iter=2", "train.max_steps=3", "optim.warmup_epochs=0",
                       "train.max_nonfinite_fraction=1", f"optim.fused={fused}", f"train.out_dir={tmp_path}"])
    t = Trainer(cfg)
    teacher = unwrap(t.model).target.branch
    real, calls, snaps = t.train_model, [0], {}

    def poisoned(images, progress):
        calls[0] += 1
        snaps[calls[0]] = [v.clone() for v in teacher.state_dict().values()]
        out = real(images, progress)
        if calls[0] == 3:
            out.loss = out.loss * float("nan")
        return out

    t.train_model = poisoned
    try:
        result = t.train()
    finally:
        t.close()
    assert result["nonfinite"] == 1 and calls[0] == 6
    same = [all(torch.equal(a, b) for a, b in zip(snaps[i], snaps[i + 1])) for i in range(1, 6)]
    # forward call 1 -> 2 (micro-batch 0 of step 0): the EMA towards a student still equal to the teacher;
    # 2 -> 3: step 0 moved the student, then the teacher; 3 -> 4: moved after the poisoned micro-batch;
    # 4 -> 5: the skipped step restores the step-boundary teacher; 5 -> 6: moved again
    assert same == [True, False, False, False, False]
    assert all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[5]))
