"""Hand-computed checks of the OIM, SimSiam and IAM losses, and a 2-process OIM sync test."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from hybridps.pretrain.losses.iam import (InterTaskAlignment, IntraTaskAlignment, consistency_loss, domain_ce,
                                 grad_reverse)
from hybridps.pretrain.losses.oim import OIMLoss, occurrence_index, sample_columns
from hybridps.pretrain.losses.simsiam import PredictionMLP, negative_cosine, output_std, simsiam_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def small_oim(**kw) -> OIMLoss:
    oim = OIMLoss(dim=2, num_pids=3, cq_size=2, momentum=0.5, scalar=10.0, **kw)
    oim.lut.copy_(torch.stack([unit(1, 0), unit(0, 1), unit(1, 1)]))
    oim.cq.copy_(torch.stack([unit(-1, 0), unit(0, -1)]))
    return oim


# ----------------------------------------------------------------------------------------- OIM
def test_oim_loss_matches_hand_computation():
    oim = small_oim()
    x = torch.stack([unit(1, 0), unit(3, 4)]).requires_grad_(True)
    labels = torch.tensor([1, -1])
    loss = oim(x, labels)
    # Row 0 = (1,0): cosines with lut (1,0),(0,1),(.707,.707) and cq (-1,0),(0,-1).
    cos = [1.0, 0.0, math.sqrt(0.5), -1.0, 0.0]
    logits = [10 * c for c in cos]
    expected = -(logits[1] - math.log(sum(math.exp(v) for v in logits)))   # only the labelled row
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_oim_gradient_and_momentum_update():
    oim = small_oim()
    old_lut, old_cq = oim.lut.clone(), oim.cq.clone()
    x0, x1 = unit(1, 0), unit(3, 4)
    x = torch.stack([x0, x1]).requires_grad_(True)
    oim(x, torch.tensor([1, -1])).backward()
    # gradient = the one of plain cross entropy on logits computed from the pre-update tables
    ref_x = torch.stack([x0, x1]).requires_grad_(True)
    bank = torch.cat([old_lut, old_cq])
    F.cross_entropy((ref_x[:1] @ bank.t()) * 10.0, torch.tensor([1])).backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)
    # lut[1] <- normalise(0.5 * (0,1) + 0.5 * (1,0)); the unlabelled row fills queue slot 0
    assert torch.allclose(oim.lut[1], unit(0.5, 0.5), atol=1e-6)
    assert torch.equal(oim.lut[[0, 2]], old_lut[[0, 2]])
    assert torch.allclose(oim.cq[0], x1) and torch.equal(oim.cq[1], old_cq[1])
    assert int(oim.header_cq) == 1


def test_oim_repeated_identity_updates_sequentially_and_queue_wraps():
    oim = small_oim()
    a, b = unit(0, 1), unit(-1, 0)
    u1, u2, u3 = unit(1, 2), unit(2, 1), unit(1, -1)
    x = torch.stack([a, u1, b, u2, u3]).requires_grad_(True)
    oim(x, torch.tensor([2, -1, 2, -1, -1])).backward()
    step1 = F.normalize(0.5 * unit(1, 1) + 0.5 * a, dim=0)
    step2 = F.normalize(0.5 * step1 + 0.5 * b, dim=0)
    assert torch.allclose(oim.lut[2], step2, atol=1e-6)
    # three pushes into two slots starting at 0: slot 0 gets u1 then u3, slot 1 gets u2
    assert torch.allclose(oim.cq[0], u3) and torch.allclose(oim.cq[1], u2)
    assert int(oim.header_cq) == 1


def test_oim_without_labelled_rows_is_zero_but_still_queues():
    oim = small_oim()
    x = torch.stack([unit(1, 2)]).requires_grad_(True)
    loss = oim(x, torch.tensor([-1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.allclose(oim.cq[0], unit(1, 2)) and int(oim.header_cq) == 1
    empty = oim(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0


def test_oim_rejects_out_of_range_labels():
    oim = small_oim()
    with pytest.raises(ValueError, match="labels must lie in"):
        oim(torch.zeros(1, 2), torch.tensor([3]))
    with pytest.raises(ValueError, match="OIM expects"):
        oim(torch.zeros(1, 3), torch.tensor([0]))


def test_oim_low_precision_table_and_chunking_agree_with_fp32():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(5, 8), dim=1)
    labels = torch.tensor([0, 3, -1, 7, 3])
    ref = OIMLoss(8, 10, 6, chunk=65536)
    ref.lut.copy_(F.normalize(torch.randn(10, 8), dim=1))
    ref.cq.copy_(F.normalize(torch.randn(6, 8), dim=1))
    chunked = OIMLoss(8, 10, 6, chunk=3)
    chunked.load_state_dict(ref.state_dict())
    half = OIMLoss(8, 10, 6, lut_dtype="bfloat16")
    half.lut.copy_(ref.lut)
    half.cq.copy_(ref.cq)
    assert half.lut.dtype == torch.bfloat16
    assert torch.allclose(chunked.similarities(x), ref.similarities(x), atol=1e-6)
    assert chunked(x, labels).item() == pytest.approx(ref(x, labels).item(), rel=1e-6)
    assert half(x, labels).item() == pytest.approx(ref(x, labels).item(), rel=0.05)


def test_occurrence_index():
    assert occurrence_index(torch.tensor([5, 2, 5, 5, 2, 9])).tolist() == [0, 0, 1, 2, 1, 0]



# ------------------------------------------------------------------------------- sampled OIM
def test_sampled_oim_hand_value_on_a_tiny_table():
    # 4 ids, sample 2: the positive id 1 plus one random other row, and the whole queue.
    oim = OIMLoss(dim=2, num_pids=4, cq_size=2, scalar=10.0, sample=2, sample_seed=3)
    oim.lut.copy_(torch.stack([unit(1, 0), unit(0, 1), unit(1, 1), unit(-1, 1)]))
    oim.cq.copy_(torch.stack([unit(-1, 0), unit(0, -1)]))
    x = torch.stack([unit(1, 0), unit(3, 4)]).requires_grad_(True)
    loss = oim(x, torch.tensor([1, -1]))
    cols = oim.last_columns.tolist()
    assert len(cols) == 2 and 1 in cols and cols == sorted(cols)
    lut_cos = {0: 1.0, 1: 0.0, 2: math.sqrt(0.5), 3: -math.sqrt(0.5)}      # x0 = (1,0) against each row
    logits = [10 * lut_cos[c] for c in cols] + [10 * -1.0, 10 * 0.0]      # + queue (-1,0), (0,-1)
    expected = -(10 * lut_cos[1] - math.log(sum(math.exp(v) for v in logits)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.allclose(oim.lut[1], unit(0.5, 0.5), atol=1e-6)     # the update is the full OIM's
    assert int(oim.header_cq) == 1


def test_sample_columns_deterministic_distinct_and_uniform():
    pos = torch.tensor([5, 17, 900])

    def draw(seed, size=50, n=1000):
        return sample_columns(pos, n, size, torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 50 and torch.unique(a).numel() == 50 and torch.equal(a, torch.sort(a).values)
    assert all(int(p) in a.tolist() for p in pos)
    assert int(a.min()) >= 0 and int(a.max()) < 1000
    # dense branch (more than half of the other rows wanted) and the cap at num_pids
    dense = [sample_columns(torch.tensor([1, 4]), 10, 8, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(dense[0], dense[1]) and not torch.equal(dense[0], dense[2])
    assert dense[0].numel() == 8 and torch.unique(dense[0]).numel() == 8 and {1, 4} <= set(dense[0].tolist())
    assert torch.equal(sample_columns(torch.tensor([2]), 6, 99, torch.Generator()), torch.arange(6))
    # more positives than the sample size: all positives, nothing else
    assert torch.equal(sample_columns(pos, 1000, 2, torch.Generator()), pos)
    # every negative row is drawn about equally often (uniform without replacement)
    hits = torch.zeros(40)
    for s in range(400):
        hits[sample_columns(torch.tensor([0]), 40, 6, torch.Generator().manual_seed(s))] += 1
    assert hits[0] == 400
    expected = 400 * 5 / 39
    assert float((hits[1:] - expected).abs().max()) < 0.5 * expected


def test_sampled_oim_deterministic_for_a_seed():
    def run(seed):
        torch.manual_seed(seed)             # sample_seed None: the run's seed
        oim = OIMLoss(dim=8, num_pids=200, cq_size=5, sample=20)
        oim.lut.copy_(F.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(9)), dim=1))
        g = torch.Generator().manual_seed(4)
        out = []
        for _ in range(3):
            x = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
            loss = oim(x, torch.tensor([3, 50, -1, 3, 199, -1]))
            loss.backward()
            out.append((loss.item(), oim.last_columns.clone(), x.grad.clone()))
        return out, oim.lut.clone()

    (a, lut_a), (b, lut_b), (c, _) = run(0), run(0), run(1)
    for (la, ca, ga), (lb, cb, gb) in zip(a, b):
        assert la == lb and torch.equal(ca, cb) and torch.equal(ga, gb)
    assert torch.equal(lut_a, lut_b)
    assert not torch.equal(a[0][1], a[1][1])          # a new draw every call
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, c))


@pytest.mark.parametrize("with_positive", [False, True])
def test_sampled_oim_with_sample_at_least_n_equals_full(with_positive):
    g = torch.Generator().manual_seed(0)
    lut = F.normalize(torch.randn(12, 6, generator=g), dim=1)
    cq = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    full, sampled = OIMLoss(6, 12, 4), OIMLoss(6, 12, 4, sample=12, sample_seed=0)
    for o in (full, sampled):
        o.lut.copy_(lut)
        o.cq.copy_(cq)
    for step in range(3):
        x = F.normalize(torch.randn(7, 6, generator=g), dim=1)
        labels = torch.tensor([0, 11, -1, 5, 5, -1, 2])
        pos = (F.normalize(torch.randn(7, 6, generator=g), dim=1), torch.tensor([1, 0, 0, 1, 0, 0, 1]).bool())
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la = full(xa, labels, pos if with_positive else None)
        lb = sampled(xb, labels, pos if with_positive else None)
        la.backward()
        lb.backward()
        assert lb.item() == pytest.approx(la.item(), rel=1e-5)
        assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
        assert torch.allclose(full.lut, sampled.lut, atol=1e-6) and torch.equal(full.cq, sampled.cq)
        assert torch.equal(sampled.last_columns, torch.arange(12))


def test_sampled_oim_rejects_negative_sample():
    with pytest.raises(ValueError, match="sample"):
        OIMLoss(4, 10, 2, sample=-1)

# ---------------------------------------------------------------------------- 2-process OIM sync
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 3 if rank == 0 else 2          # different counts per rank exercise the padding
    x = F.normalize(torch.randn(n, 4, generator=g), dim=1)
    labels = torch.tensor([1, -1, 4] if rank == 0 else [1, -1])
    return x, labels


class _TinyReid(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.oim = OIMLoss(dim=4, num_pids=6, cq_size=3)

    def forward(self, x, labels):
        return self.oim(F.normalize(self.proj(x), dim=1), labels)


def _oim_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    from hybridps.pretrain.losses import oim as oim_module
    # before setup the sync must refuse (a group made inside backward could deadlock)
    try:
        oim_module.sync_group()
        refused = False
    except RuntimeError:
        refused = True
    oim_module.init_sync_group()
    # from here on no group may be created (in particular not inside backward)
    created = []
    real_new_group = dist.new_group
    dist.new_group = lambda *a, **k: created.append(1) or real_new_group(*a, **k)
    oim = OIMLoss(dim=4, num_pids=6, cq_size=3)
    sampled = OIMLoss(dim=4, num_pids=6, cq_size=3, sample=2, sample_seed=7)   # partial-FC option
    losses = []
    for step in range(2):
        x, labels = _rank_data(rank, step)
        x.requires_grad_(True)
        loss = oim(x, labels)
        loss.backward()
        losses.append(loss.item())
        xs = x.detach().clone().requires_grad_(True)
        sampled(xs, labels).backward()
    # the same inside DDP: table gathers in backward next to DDP's gradient all-reduce
    torch.manual_seed(0)
    tiny = _TinyReid()
    ddp = torch.nn.parallel.DistributedDataParallel(tiny, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        x, labels = _rank_data(rank, step)
        opt.zero_grad()
        ddp(x, labels).backward()
        opt.step()
    dist.new_group = real_new_group
    torch.save({"world": dist.get_world_size(), "refused_before_setup": refused, "groups_after_setup": len(created),
                "lut": oim.lut, "cq": oim.cq, "header": oim.header_cq,
                "sampled_lut": sampled.lut, "sampled_cq": sampled.cq,
                "losses": losses, "ddp_lut": tiny.oim.lut, "ddp_weight": tiny.proj.weight.detach()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp, opt          # DDP freed while its group lives (freed after destroy it can abort at exit)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_oim_tables_identical_across_two_processes(tmp_path):
    port = _free_port()
    mp.start_processes(_oim_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["refused_before_setup"] and r1["refused_before_setup"]
    assert r0["groups_after_setup"] == r1["groups_after_setup"] == 0
    assert torch.equal(r0["lut"], r1["lut"]) and torch.equal(r0["cq"], r1["cq"])
    assert int(r0["header"]) == int(r1["header"])
    assert torch.equal(r0["ddp_lut"], r1["ddp_lut"]) and torch.equal(r0["ddp_weight"], r1["ddp_weight"])
    assert r0["ddp_lut"].abs().sum() > 0
    # reference: one process applying rank 0's rows then rank 1's, step by step
    ref = OIMLoss(dim=4, num_pids=6, cq_size=3)
    for step in range(2):
        local_losses = []
        for rank in (0, 1):
            x, labels = _rank_data(rank, step)
            local_losses.append(ref(x, labels).item())   # loss uses local features only
        assert r0["losses"][step] == pytest.approx(local_losses[0], rel=1e-6)
        assert r1["losses"][step] == pytest.approx(local_losses[1], rel=1e-6)
        xs, ls = zip(*(_rank_data(rank, step) for rank in (0, 1)))
        ref.update(torch.cat(xs), torch.cat(ls))
    assert torch.allclose(r0["lut"], ref.lut, atol=1e-6) and torch.allclose(r0["cq"], ref.cq, atol=1e-6)
    # the sampled option changes the logits only: its tables follow the same synced update
    assert torch.equal(r0["sampled_lut"], r1["sampled_lut"]) and torch.equal(r0["sampled_cq"], r1["sampled_cq"])
    assert torch.allclose(r0["sampled_lut"], ref.lut, atol=1e-6) and torch.allclose(r0["sampled_cq"], ref.cq, atol=1e-6)
    assert r0["lut"][1].norm().item() == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------------------------- SimSiam
def test_simsiam_loss_hand_value():
    p1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])   # cos 0
    p2, z1 = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])   # cos 1/sqrt(2)
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(-0.5 / math.sqrt(2), rel=1e-6)
    assert negative_cosine(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 4.0]])).item() == pytest.approx(-1.0)


def test_simsiam_stop_gradient_blocks_target_branch():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_simsiam_through_predictor_reaches_encoder_only_via_prediction():
    torch.manual_seed(0)
    pred = PredictionMLP(8, 4)
    h = torch.randn(6, 8, requires_grad=True)
    z = h * 2                       # stand-in encoder output
    loss = simsiam_loss(pred(z[:3]), pred(z[3:]), z[:3], z[3:])
    grad_h, = torch.autograd.grad(loss, h)
    # only the prediction path carries gradient; it is non-zero and finite
    assert torch.isfinite(grad_h).all() and grad_h.abs().sum() > 0


def test_output_std_monitor():
    torch.manual_seed(0)
    assert output_std(torch.ones(10, 16)).item() == pytest.approx(0.0, abs=1e-6)
    healthy = output_std(torch.randn(4096, 256)).item()
    assert healthy == pytest.approx(1 / math.sqrt(256), rel=0.1)
    assert math.isnan(output_std(torch.randn(1, 4)).item())


def test_empty_pairs_give_connected_zero():
    p = torch.zeros(0, 4, requires_grad=True)
    loss = simsiam_loss(p, p, p, p)
    loss.backward()
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------------------- IAM
def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.25 * w)


def test_domain_ce_hand_value_and_pooling():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert domain_ce(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)
    per_position = logits[:, :, None, None].expand(1, 3, 4, 5)
    assert domain_ce(per_position, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_zero_when_levels_agree_positive_otherwise():
    ln3 = math.log(3.0)
    # two positions: softmax (.75,.25) and (.5,.5) -> image probability (.625,.375)
    img = torch.tensor([[[[ln3, 0.0]], [[0.0, 0.0]]]])          # [1, K=2, h=1, w=2]
    agree = torch.log(torch.tensor([[0.625, 0.375]]))
    assert consistency_loss(img, agree, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[0.0, 0.0]])                          # (.5,.5): distance .125*sqrt(2)
    value = consistency_loss(img, other, torch.tensor([0])).item()
    assert value == pytest.approx(0.125 * math.sqrt(2), rel=1e-4)
    ins = agree.clone().requires_grad_(True)
    consistency_loss(img, ins, torch.tensor([0])).backward()
    assert torch.isfinite(ins.grad).all()


def test_intra_task_alignment_reverses_feature_gradient():
    torch.manual_seed(0)
    iam = IntraTaskAlignment(img_channels=6, ins_dim=5, num_domains=3, grl_coef=1.0, img_hidden=8, ins_hidden=8)
    img = torch.randn(2, 6, 4, 4, requires_grad=True)
    ins = torch.randn(5, 5, requires_grad=True)
    dom, idx = torch.tensor([0, 2]), torch.tensor([0, 0, 1, 1, 1])
    out = iam(img, dom, ins, idx)
    assert set(out) == {"loss_img", "loss_ins", "loss_cst", "acc_img", "acc_ins"}
    (out["loss_img"] + out["loss_ins"]).backward()
    g_reversed = img.grad.clone()
    img.grad = None
    iam.grl.coef = -1.0                         # same classifier without reversal
    out = iam(img, dom, ins, idx)
    (out["loss_img"] + out["loss_ins"]).backward()
    assert torch.allclose(g_reversed, -img.grad, atol=1e-7) and g_reversed.abs().sum() > 0
    assert iam.img_cls.img_head.weight.grad is not None and iam.ins_cls.ins_head.weight.grad is not None


def test_intra_task_alignment_needs_two_domains():
    with pytest.raises(ValueError, match=">= 2 domains"):
        IntraTaskAlignment(4, 4, 1)


def test_inter_task_alignment_runs():
    torch.manual_seed(0)
    inter = InterTaskAlignment(channels=6, hidden=8)
    det = torch.randn(2, 6, 5, 5, requires_grad=True)
    reid = torch.randn(7, 6, 3, 3, requires_grad=True)
    out = inter(det, reid)
    out["loss_task"].backward()
    assert out["loss_task"].item() == pytest.approx(math.log(2), abs=0.3)
    assert 0.0 <= out["acc_task"].item() <= 1.0 and det.grad.abs().sum() > 0 and reid.grad.abs().sum() > 0
