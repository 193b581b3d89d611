"""iDLG — Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients" (2020).

DLG (``attacks/dlg.py``) with the labels recovered analytically first and held fixed: for
cross-entropy and one example the true label is the only class whose head gradient is negative
(``attacks.labels.idlg_label``); for a batch the bias-corrected counts (``attacks.labels.batch_labels``).
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.dlg import DLG
from attacks.inverting_gradients import recover_labels


@dataclass
class IDLG(DLG):
    optimize_labels: bool = False
    name: str = "idlg"

    def _labels(self, model, observation, knowledge, sim):
        return recover_labels(model, observation, knowledge, sim)
