"""The report of a sweep: one table and a few pictures over the runs of a Hydra multirun.

``fl-sim -m defense=dpsgd defense.noise_multiplier=0,0.3,1.0 attack=inverting_gradients`` leaves one
run directory per job (``<sweep dir>/0/``, ``1/``, ...), each with its ``summary.json``.
``fl-sim-report <sweep dir>`` (and the CLI at the end of a sweep) reads those and only those, and
writes into the sweep directory:

- ``sweep_report.md`` — the setting, one row per run, mean ± std over seeds, failed runs with their error;
- ``sweep.json`` — the same rows as data (ε = ∞ written as the string "inf", a missing value as null);
- ``sweep_epsilon.png`` — ε against final test accuracy and attack PSNR (the privacy–utility–leakage picture);
- ``sweep_parameter.png`` — the swept parameter against the same metrics.

How each number is made (nothing else is computed):

- ε of a run: the worst client's ε(δ) — each client's guarantee composed over every round it trained
  (``privacy.epsilon``, ``privacy.infinite``; see ``fl_sim.privacy``). No privacy mechanism (``privacy``
  null) or a mechanism without noise: ε = ∞. Not accounted (central DP with adaptive clipping): no number.
- final test accuracy: the global model's accuracy on the held-out test split after the last round.
- PSNR / SSIM / label accuracy: the mean over the run's attack entries (one entry = one attacked client
  in one round; its value is already the mean over that client's batch, after Hungarian matching).
  Entries whose attack failed are counted apart, never scored.
- MI attack accuracy: model inversion of the final model (``observed: "model"``), the share of its
  reconstructions that the evaluation classifier puts in their target class, mean over the run's entries.
- Runs that share every swept value but the seed are aggregated: mean ± sample standard deviation
  (n − 1 in the denominator), n stated. Failed runs are listed, and left out of means and pictures.

>>> path = write_sweep_report("multirun/2026-11-22/08-00-00")   # doctest: +SKIP

The package reads top to bottom: ``runs`` (from run folders to rows and groups), ``text`` (numbers
as text, and the tables), ``plots`` (the pictures), ``report`` (the files, and ``fl-sim-report``).
"""

from fl_sim.sweep.report import (EPSILON_PLOT, JSON_NAME, PARAMETER_PLOT, REPORT_NAME, TRADEOFF_PLOT, main,
                                 write_sweep_report)
from fl_sim.sweep.runs import SweepReportError, epsilon_of

__all__ = ["EPSILON_PLOT", "JSON_NAME", "PARAMETER_PLOT", "REPORT_NAME", "TRADEOFF_PLOT", "SweepReportError",
           "epsilon_of", "main", "write_sweep_report"]
