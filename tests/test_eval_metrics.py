"""Evaluation math against hand computations and scikit-learn: top-k, kNN, linear probes, clustering."""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
    top_k_accuracy_score,
)

from twist_hf.evaluation import (
    class_balanced_subset,
    cluster_metrics,
    hungarian_match,
    knn_class_votes,
    knn_evaluate,
    linear_probe_on_features,
    matched_class_probabilities,
    semi_recipe,
    topk_accuracy,
    train_linear_probes,
)


def separable_blobs(samples: int, classes: int = 4, dims: int = 16, seed: int = 0):
    """Gaussian blobs around far-apart orthogonal centres: every protocol should be perfect on them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % classes
    centres = 10 * torch.eye(classes, dims)
    return centres[labels] + 0.5 * torch.randn(samples, dims, generator=generator), labels


def test_topk_accuracy_matches_scikit_learn():
    generator = torch.Generator().manual_seed(1)
    scores, labels = torch.randn(50, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
    ours = topk_accuracy(scores, labels, (1, 3, 5))
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k, labels=np.arange(7))
        assert ours[k] == pytest.approx(expected)


def test_topk_accuracy_caps_k_at_the_number_of_classes():
    assert topk_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([0, 0]), (1, 5)) == {
        1: 0.5,
        5: 1.0,
    }


def test_topk_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same N"):
        topk_accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_knn_votes_are_exp_cosine_over_temperature_summed_per_class():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[2.0, 0.0]])
    votes = knn_class_votes(train, labels, test, num_classes=2, ks=(2, 3), temperature=0.5)
    # cosines to the test point: 1, 0, 1/sqrt(2), -1; the nearest are rows 0, 2, then 1.
    assert votes[2][0].tolist() == pytest.approx([math.exp(1 / 0.5), math.exp(2**-0.5 / 0.5)])
    assert votes[3][0].tolist() == pytest.approx([math.exp(2.0), math.exp(2**-0.5 / 0.5) + math.exp(0.0)])


def test_knn_chunking_does_not_change_the_votes():
    features, labels = separable_blobs(60)
    whole = knn_class_votes(features, labels, features[:25], 4, ks=(5,), chunk_size=1000)[5]
    chunked = knn_class_votes(features, labels, features[:25], 4, ks=(5,), chunk_size=7)[5]
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=0)  # votes ~ exp(1 / 0.07): float32 summation order


def test_knn_on_separable_features_is_perfect_for_every_k():
    train, train_labels = separable_blobs(400)
    test, test_labels = separable_blobs(100, seed=1)
    metrics = knn_evaluate(train, train_labels, test, test_labels, num_classes=4, ks=(20, 200))
    assert metrics == {
        "knn_k20_top1": 1.0,
        "knn_k20_top5": 1.0,
        "knn_k200_top1": 1.0,
        "knn_k200_top5": 1.0,
        "knn_top1": 1.0,
        "knn_top5": 1.0,
    }


def test_knn_rejects_feature_width_mismatch():
    with pytest.raises(ValueError, match="same model"):
        knn_class_votes(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(2, 5), 2)


def test_linear_probes_with_different_lrs_train_independently():
    features, labels = separable_blobs(64)
    stacked = train_linear_probes(features, labels, 4, learning_rates=(0.01, 0.1), epochs=3, batch_size=16)
    single = train_linear_probes(features, labels, 4, learning_rates=(0.1,), epochs=3, batch_size=16)
    torch.testing.assert_close(stacked.weight[1], single.weight[0])
    torch.testing.assert_close(stacked.bias[1], single.bias[0])


def test_linear_probe_on_separable_features_converges():
    train, train_labels = separable_blobs(200)
    test, test_labels = separable_blobs(100, seed=1)
    probes = train_linear_probes(train, train_labels, 4, learning_rates=(0.1,), epochs=10, batch_size=64)
    logits = probes.scores(train)[0]
    assert torch.nn.functional.cross_entropy(logits, train_labels).item() < 0.05
    metrics = linear_probe_on_features(train, train_labels, test, test_labels, 4, epochs=10, batch_size=64)
    assert metrics["linear_top1"] == 1.0 and metrics["linear_val_top1"] == 1.0
    assert metrics["linear_best_lr"] in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def test_linear_probe_rejects_bad_learning_rates():
    features, labels = separable_blobs(8)
    with pytest.raises(ValueError, match="learning_rates"):
        train_linear_probes(features, labels, 4, learning_rates=(0.1, -1.0))


def test_hungarian_on_a_permuted_labelling_gives_accuracy_one():
    labels = torch.arange(40) % 5
    permutation = torch.tensor([3, 0, 4, 1, 2])
    logits = torch.nn.functional.one_hot(permutation[labels], 5).float() * 5
    metrics = cluster_metrics(logits, labels, num_labels=5)
    assert metrics["cluster_acc"] == 1.0 and metrics["cluster_top5_acc"] == 1.0
    assert metrics["cluster_nmi"] == pytest.approx(1.0) and metrics["cluster_ari"] == pytest.approx(1.0)
    assert hungarian_match(permutation[labels].numpy(), labels.numpy(), 5, 5).tolist() == [1, 3, 4, 0, 2]


def test_cluster_accuracy_equals_the_best_permutation_found_by_brute_force():
    generator = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(60, 4, generator=generator), torch.randint(0, 4, (60,), generator=generator)
    clusters = logits.argmax(dim=1)
    best = max((torch.tensor(p)[clusters] == labels).float().mean().item() for p in itertools.permutations(range(4)))
    assert cluster_metrics(logits, labels, 4)["cluster_acc"] == pytest.approx(best)


def test_cluster_information_scores_are_scikit_learns_on_the_argmax():
    generator = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(80, 6, generator=generator), torch.randint(0, 3, (80,), generator=generator)
    clusters, truth = logits.argmax(dim=1).numpy(), labels.numpy()
    metrics = cluster_metrics(logits, labels, 3)
    assert metrics["cluster_nmi"] == pytest.approx(normalized_mutual_info_score(truth, clusters))
    assert metrics["cluster_ami"] == pytest.approx(adjusted_mutual_info_score(truth, clusters))
    assert metrics["cluster_ari"] == pytest.approx(adjusted_rand_score(truth, clusters))


def test_extra_clusters_stay_unmatched_and_count_as_errors():
    # clusters 0,0,1,1,2,2 against labels 1,1,0,0,0,0: best match c0->1, c1->0; c2 is left unmatched.
    clusters, labels = np.array([0, 0, 1, 1, 2, 2]), np.array([1, 1, 0, 0, 0, 0])
    assert hungarian_match(clusters, labels, num_clusters=3, num_labels=2).tolist() == [1, 0, -1]
    logits = torch.nn.functional.one_hot(torch.as_tensor(clusters), 3).float()
    assert cluster_metrics(logits, torch.as_tensor(labels), 2)["cluster_acc"] == pytest.approx(4 / 6)


def test_matched_probabilities_read_each_label_from_its_cluster():
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert matched_class_probabilities(probabilities, np.array([2, -1, 0, 1])).tolist() == [
        pytest.approx([0.3, 0.4, 0.1])
    ]


def test_matched_top5_accuracy_by_hand():
    # 6 clusters = 6 labels, identity matching from the diagonal; sample 6 puts its truth 6th.
    logits = torch.eye(6) * 10
    extra = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    metrics = cluster_metrics(torch.cat([logits, extra]), torch.tensor([0, 1, 2, 3, 4, 5, 5]), 6)
    assert metrics["cluster_top5_acc"] == pytest.approx(6 / 7)
    assert metrics["cluster_acc"] == pytest.approx(6 / 7)


def test_clustering_needs_at_least_as_many_head_classes_as_labels():
    with pytest.raises(ValueError, match="K=3 classes but the dataset has 5 labels"):
        cluster_metrics(torch.randn(10, 3), torch.arange(10) % 5, num_labels=5)


def test_class_balanced_subset_takes_the_fraction_of_every_class_reproducibly():
    labels = np.repeat(np.arange(4), [100, 200, 50, 3])
    subset = class_balanced_subset(labels, 0.1, seed=7)
    assert np.bincount(labels[subset]).tolist() == [10, 20, 5, 1]
    assert subset.tolist() == class_balanced_subset(labels, 0.1, seed=7).tolist()
    assert subset.tolist() != class_balanced_subset(labels, 0.1, seed=8).tolist()
    with pytest.raises(ValueError, match="fraction"):
        class_balanced_subset(labels, 0.0)


def test_semi_recipes_follow_the_paper_table():
    assert semi_recipe(0.01) == (20, 0.04)
    assert semi_recipe(0.1) == (20, 0.02)
    assert semi_recipe(1.0) == (30, 0.01)
    assert semi_recipe(0.012) == (20, 0.04)
