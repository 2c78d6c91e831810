"""personclf-tune: transfer learning and hyperparameter search for person classifiers."""

__version__ = "0.1.0"
