"""The online kNN monitor (objloader.ssl.knn) against the protocol written out literally."""
import math

import torch

from objloader.ssl.knn import knn_predict


def _literal(bank, labels, queries, num_classes, k, t):
    """Wu et al. 2018's weighted kNN, one query at a time with plain Python."""
    preds = []
    for q in queries:
        sims = []
        for j, b in enumerate(bank):
            cos = float(q @ b) / (float(q.norm()) * float(b.norm()))
            sims.append((cos, j))
        sims.sort(reverse=True)
        votes = [0.0] * num_classes
        for cos, j in sims[:k]:
            votes[int(labels[j])] += math.exp(cos / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_predict_equals_the_protocol_written_literally():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(150, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 5, (150,), generator=g)
    for k, t in ((20, 0.07), (5, 0.5), (200, 0.07)):  # k larger than the bank: all of it
        got = knn_predict(bank, labels, queries, 5, k=k, temperature=t, chunk=7)
        assert torch.equal(got, _literal(bank, labels, queries, 5, min(k, 150), t))


def test_knn_of_separable_features_is_perfect_and_of_shuffled_labels_is_not():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 32, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(50)
    bank = centres[labels] + torch.randn(200, 32, generator=g)
    q_labels = torch.arange(4).repeat_interleave(10)
    queries = centres[q_labels] + torch.randn(40, 32, generator=g)
    assert torch.equal(knn_predict(bank, labels, queries, 4), q_labels)
    shuffled = labels[torch.randperm(200, generator=g)]
    assert (knn_predict(bank, shuffled, queries, 4) == q_labels).float().mean() < 0.6
