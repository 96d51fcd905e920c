"""Analysis layer: closed-form influence of classical density estimators and influential latent factors.

* :mod:`proponent.analysis.classical` -- influence functions of the k-NN density estimator, the
  Gaussian KDE and the well-separated spherical GMM (Kong & Chaudhuri 2021, §3, eqs. 1-5), their
  leave-one-out ground truth, the six-cluster toy and its figures.
* :mod:`proponent.analysis.factors` -- mutual information between the input and each latent factor of
  a VAE encoder (arXiv 1809.01804), and the split into influential and collapsed factors.
"""
