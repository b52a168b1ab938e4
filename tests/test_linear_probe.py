"""The linear probe: its classifier is the optimum of the stated objective (checked against an
independent float64 numpy + scipy solve), cross-validation sees the train split only, and the probe
scores 1.0 on separable data and chance on random labels.

Every fit here uses the same (rows, features, classes) shapes, so the L-BFGS program compiles once.
"""

import numpy as np
import pytest
import scipy.optimize

from aasp_jax.evaluate import linear_probe

N, D, C = 96, 6, 3


def reference_fit(x, y, num_classes, l2):
  """argmin_W,b mean CE(xW + b, y) + l2/2 ||W||^2 in float64 with scipy's L-BFGS-B."""
  x = np.asarray(x, np.float64)
  n, d = x.shape
  one_hot = np.eye(num_classes)[y]

  def loss_and_grad(theta):
    w, b = theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes :]
    z = x @ w + b
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -np.mean(np.sum(one_hot * log_p, axis=1)) + 0.5 * l2 * np.sum(w**2)
    g = (np.exp(log_p) - one_hot) / n
    return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

  result = scipy.optimize.minimize(
    loss_and_grad,
    np.zeros(d * num_classes + num_classes),
    jac=True,
    method='L-BFGS-B',
    options=dict(maxiter=20_000, gtol=1e-12, ftol=1e-15),
  )
  assert result.success, result.message
  theta = result.x
  return theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes :], result.fun


def softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def noisy_linear_data(seed, n=N):
  """Labels from a random linear rule plus noise: learnable, not separable."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D))
  y = np.argmax(x @ rng.normal(size=(D, C)) + rng.normal(scale=1.0, size=(n, C)), axis=1)
  return x, y


def blobs(seed, n, spread=1.0):
  """C well-separated Gaussian blobs, labels balanced."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % C
  centres = 10.0 * np.eye(C, D)
  return centres[y] + spread * rng.normal(size=(n, D)), y


@pytest.mark.parametrize('l2', [0.01, 0.3])
def test_fit_is_the_optimum_of_the_objective(l2):
  x, y = noisy_linear_data(0)
  model = linear_probe.fit_logistic_regression(x, y, C, l2)
  w_ref, b_ref, loss_ref = reference_fit(x, y, C, l2)
  assert model.grad_norm < linear_probe.TOLERANCE
  np.testing.assert_allclose(model.weights, w_ref, atol=2e-4)
  np.testing.assert_allclose(model.bias, b_ref, atol=2e-4)
  np.testing.assert_allclose(softmax(model.logits(x)), softmax(x @ w_ref + b_ref), atol=2e-5)
  ours = float(
    linear_probe.objective(
      {'w': model.weights, 'b': model.bias}, x.astype(np.float32), y, np.ones(N, np.float32), l2
    )
  )
  assert abs(ours - loss_ref) < 1e-5


def test_zero_weight_rows_are_left_out_exactly():
  x, y = noisy_linear_data(1)
  keep = np.arange(N) % 3 != 0
  model = linear_probe.fit_logistic_regression(x, y, C, 0.05, sample_weight=keep.astype(float))
  w_ref, b_ref, _ = reference_fit(x[keep], y[keep], C, 0.05)
  np.testing.assert_allclose(model.weights, w_ref, atol=2e-4)
  np.testing.assert_allclose(model.bias, b_ref, atol=2e-4)


def test_separable_data_is_classified_perfectly():
  train_x, train_y = blobs(2, N)
  test_x, test_y = blobs(3, 300)
  result = linear_probe.probe(train_x, train_y, test_x, test_y, C)
  assert result.accuracy == 1.0 and result.train_accuracy == 1.0
  assert result.num_train == N and result.num_test == 300
  assert result.l2 in linear_probe.DEFAULT_L2_GRID


def test_random_labels_score_chance_on_held_out_data():
  rng = np.random.default_rng(4)
  train_x, train_y = rng.normal(size=(N, D)), rng.integers(0, C, N)
  test_x, test_y = rng.normal(size=(3000, D)), rng.integers(0, C, 3000)
  result = linear_probe.probe(train_x, train_y, test_x, test_y, C)
  # Labels independent of x: any classifier scores 1/3 in expectation; std of the estimate ~0.009.
  assert abs(result.accuracy - 1 / C) < 0.05
  assert max(result.cv_accuracy.values()) < 0.6


def test_model_selection_never_sees_the_test_split():
  train_x, train_y = noisy_linear_data(5)
  test_x, test_y = noisy_linear_data(6, n=40)
  result = linear_probe.probe(train_x, train_y, test_x, test_y, C)
  rng = np.random.default_rng(7)
  shuffled = linear_probe.probe(
    train_x, train_y, rng.normal(size=test_x.shape) * 100.0, rng.permutation(test_y), C
  )
  assert shuffled.l2 == result.l2
  assert shuffled.cv_accuracy == result.cv_accuracy
  assert shuffled.train_accuracy == result.train_accuracy


def test_non_finite_features_are_refused():
  x, y = noisy_linear_data(8)
  bad = x.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match='test features hold NaN'):
    linear_probe.probe(x, y, bad, y, C)


def test_select_l2_breaks_ties_towards_stronger_regularisation():
  assert linear_probe.select_l2({0.001: 0.5, 0.01: 0.7, 0.1: 0.7, 1.0: 0.6}) == 0.1
  assert linear_probe.select_l2({0.001: 0.9, 0.01: 0.7}) == 0.001


def test_stratified_folds_deal_each_class_evenly():
  y = np.array([0] * 11 + [1] * 5 + [2] * 3)
  fold = linear_probe.stratified_folds(y, 5)
  for label in range(3):
    counts = np.bincount(fold[y == label], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == np.sum(y == label)


def test_standardizer_uses_the_given_rows_and_keeps_constant_features():
  x = np.array([[1.0, 5.0], [3.0, 5.0]])
  s = linear_probe.Standardizer.fit(x)
  np.testing.assert_allclose(s(x), [[-1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(s(np.array([[5.0, 7.0]])), [[3.0, 2.0]])


def write_manifest(path, rows):
  with open(path, 'w') as f:
    f.write('path,labels\n' + ''.join(f'{p},{label}\n' for p, label in rows))
  return str(path)


def test_probe_encoder_names_the_manifest_of_an_unseen_label(tmp_path):
  # Label checks run before any audio is read, so no encoder is needed to reach them.
  train = write_manifest(tmp_path / 'train.csv', [('a.flac', 'dog'), ('b.flac', 'cat')])
  test = write_manifest(tmp_path / 'test.csv', [('c.flac', 'dog'), ('d.flac', 'cow')])
  with pytest.raises(ValueError, match=r"test\.csv.*\['cow'\].*do not occur in the train"):
    linear_probe.probe_encoder(None, None, None, train, test)


def test_probe_encoder_needs_one_label_per_clip(tmp_path):
  train = write_manifest(tmp_path / 'train.csv', [('a.flac', 'dog;cat'), ('b.flac', 'cat')])
  test = write_manifest(tmp_path / 'test.csv', [('c.flac', 'dog')])
  with pytest.raises(ValueError, match=r"train\.csv.*'a\.flac' has 2 labels"):
    linear_probe.probe_encoder(None, None, None, train, test)
