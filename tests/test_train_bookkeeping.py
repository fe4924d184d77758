"""Training bookkeeping against numbers computed by hand on a tiny batch: train_one_epoch's and
evaluate's loss, accuracy, output rate and confusion matrix; the validation split's sizes per
class at its edges. The network is a table of fixed outputs, so every number is known exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvsg_train.data import split_train_val
from dvsg_train.engine import evaluate, train_one_epoch

# outputs [11] per sample id; labels 3, 5, 0
TABLE = torch.zeros(3, 11)
TABLE[0, 3] = 0.5                    # argmax 3 = label 3: right; squared error (0.5 - 1)^2 = 0.25
TABLE[1, 2], TABLE[1, 5] = 0.5, 0.25  # argmax 2 != label 5: wrong; 0.5^2 + (0.25 - 1)^2 = 0.8125
TABLE[2, 0] = 1.0                    # argmax 0 = label 0: right; 0
LABELS = [3, 5, 0]
# mean squared error over the 3 x 11 outputs, each batch's mean weighted by its size:
# (0.25 + 0.8125 + 0) / 33 (an unweighted mean of the two batches' means would be 1.0625 / 44)
LOSS = 1.0625 / 33
OUT_RATE = (0.5 + 0.75 + 1.0) / 33   # the outputs' mean


class Table(nn.Module):
    """Output = TABLE[sample id] + bias (bias 0, lr 0: fixed), the id read from the frames."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x [T, B, 2, 1, 1]
        return TABLE[x[0, :, 0, 0, 0].long()] + self.bias


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 2 and 1 samples: frames [B, T=1, 2, 1, 1] uint8 carrying the id."""
    def frames(ids):
        f = torch.zeros(len(ids), 1, 2, 1, 1, dtype=torch.uint8)
        f[:, 0, 0, 0, 0] = torch.tensor(ids, dtype=torch.uint8)
        return f
    return [(frames([0, 1]), torch.tensor(LABELS[:2])), (frames([2]), torch.tensor(LABELS[2:]))]


def test_train_one_epoch_loss_accuracy_and_rate_by_hand():
    model = Table()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    r = train_one_epoch(model, _batches(), opt, torch.device("cpu"))
    # float32 MSE of exact binary fractions (multiples of 1/16, sums below 2): exact up to the
    # float32 division by 22 and by 11 (1 ulp each) -> 4 float32 ulps of LOSS
    assert abs(r["loss"] - LOSS) <= 4 * np.spacing(np.float32(LOSS))
    assert r["acc"] == 2 / 3 and r["samples"] == 3
    assert r["output_rate"] == pytest.approx(OUT_RATE, rel=0, abs=1e-15)   # float64 sum of exact floats
    assert model.training                                                 # left in train mode


def test_evaluate_loss_accuracy_and_confusion_by_hand():
    model = Table()
    r = evaluate(model, _batches(), torch.device("cpu"))
    assert abs(r["loss"] - LOSS) <= 4 * np.spacing(np.float32(LOSS))
    assert r["acc"] == 2 / 3 and r["samples"] == 3
    want = np.zeros((11, 11), dtype=np.int64)
    want[3, 3] = want[5, 2] = want[0, 0] = 1                             # rows: true label
    assert np.array_equal(r["confusion"], want)
    assert not model.training


def test_evaluate_of_no_batch_is_zero_not_a_division_by_zero():
    r = evaluate(Table(), [], torch.device("cpu"))
    assert (r["loss"], r["acc"], r["samples"]) == (0.0, 0.0, 0)


@pytest.mark.parametrize("fraction,want", [
    # per class c the validation count, by hand: round(fraction * n_c) (Python's round: half to
    # even), at least 1 and at most n_c - 1 when n_c >= 2, 0 when n_c < 2
    (0.5, {0: 0, 1: 1, 2: 5, 3: 5, 4: 2, 5: 4}),     # 1 -> 0; 2 -> 1; 10 -> 5; 5 -> 2.5 -> 2; 7 -> 3.5 -> 4
    (0.1, {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}),     # 2 -> 0.2 -> at least 1; 5 -> 0.5 -> 0 -> 1; 7 -> 0.7 -> 1
    (0.99, {0: 0, 1: 1, 2: 9, 3: 9, 4: 4, 5: 6}),    # at most n - 1: 10 -> 9.9 -> 10 -> 9; 2 -> 1
])
def test_split_sizes_per_class_at_the_edges(fraction, want):
    counts = {0: 1, 1: 2, 2: 10, 3: 10, 4: 5, 5: 7}  # classes 6..10 have no sample
    labels = np.repeat(np.array(list(counts)), list(counts.values()))
    np.random.default_rng(0).shuffle(labels)
    tr, va = split_train_val(labels, fraction, seed=1)
    assert {c: int((labels[va] == c).sum()) for c in counts} == want
    assert tr.dtype == va.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))   # a partition
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)                          # sorted


@pytest.mark.parametrize("fraction", [0.0, -0.1])
def test_no_validation_split_keeps_every_sample_in_order(fraction):
    labels = np.array([4, 4, 1, 1, 1])
    tr, va = split_train_val(labels, fraction, seed=1)
    assert tr.tolist() == [0, 1, 2, 3, 4] and va.tolist() == [] and va.dtype == np.int64


def test_step_dropout_keeps_one_mask_per_sample_from_the_first_step_until_reset():
    from dvsg_train.model import StepDropout

    torch.manual_seed(0)
    d = StepDropout(0.5).train()
    x0, x1 = torch.full((4, 64), 3.0), torch.full((4, 64), 5.0)
    m0 = d(x0) / 3.0                                  # the mask: 0 or 1 / (1 - p) = 2
    assert set(m0.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(d(x1) / 5.0, m0)               # step 2: the same mask, not a new one
    assert len({tuple(r) for r in m0.tolist()}) == 4  # one mask per sample (and per feature)
    d.reset()
    assert d.mask is None
    assert not torch.equal(d(x0) / 3.0, m0)           # a new sequence: a new mask
    d.reset()
    d.eval()
    assert torch.equal(d(x1), x1) and d.mask is None  # eval: identity, nothing drawn
    d.train()
    d.p = 0
    assert torch.equal(d(x1), x1) and d.mask is None


def test_sequence_dropout_shares_each_samples_mask_over_time():
    from dvsg_train.model import SequenceDropout

    torch.manual_seed(0)
    d = SequenceDropout(0.5).train()
    x = torch.arange(1, 4, dtype=torch.float32).view(3, 1, 1).expand(3, 4, 64)   # x[t] = t + 1
    m = d(x) / x
    assert set(m.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])                   # all steps alike
    assert len({tuple(r) for r in m[0].tolist()}) == 4                          # samples differ
    assert torch.equal(d.eval()(x), x)


def test_stepwise_net_resets_its_dropout_masks_around_every_forward():
    from dvsg_train.model import StepDropout, StepwiseNet

    torch.manual_seed(0)
    net = StepwiseNet(channels=2).train()
    drops = [m for m in net.modules() if isinstance(m, StepDropout)]
    assert len(drops) == 2
    seen = []
    for d in drops:   # record each layer's mask at every step of the forward
        d.register_forward_hook(lambda mod, inp, out: seen.append(mod.mask.clone()))
    x = torch.rand(2, 2, 2, 128, 128).round()
    net(x)
    assert all(d.mask is None for d in drops)          # reset after the forward
    first = seen[:]                                    # [t0 d1, t0 d2, t1 d1, t1 d2]
    assert len(first) == 4
    for k in (0, 1):
        assert torch.equal(first[k], first[k + 2])
        assert first[k].shape[0] == 2 and not torch.equal(first[k][0], first[k][1])
    seen.clear()
    net(x)
    assert not torch.equal(seen[0], first[0])          # reset before: a new mask per forward
