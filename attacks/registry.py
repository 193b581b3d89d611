"""Attacks by config name: ``make_attack("inverting_gradients", iterations=1000)``."""

from __future__ import annotations

from attacks.analytic import Analytic
from attacks.deepinversion import DeepInversion
from attacks.dlg import DLG
from attacks.fsha import FSHA
from attacks.gmi import GMI
from attacks.hitaj import Hitaj
from attacks.idlg import IDLG
from attacks.imprint import Imprint
from attacks.inverting_gradients import InvertingGradients
from attacks.inverse_network import InverseNetwork
from attacks.kedmi import KEDMI
from attacks.mi_face import MIFace
from attacks.plgmi import PLGMI
from attacks.rmle import RMLE
from attacks.unsplit import UnSplit

ATTACKS = {
    "dlg": DLG,
    "idlg": IDLG,
    "inverting_gradients": InvertingGradients,
    "analytic": Analytic,
    "imprint": Imprint,
    "rmle": RMLE,  # split learning: activations at the cut
    "inverse_network": InverseNetwork,
    "unsplit": UnSplit,
    "fsha": FSHA,  # split learning, malicious server: hijacks the client's training (setup/hijack first)
    "mi_face": MIFace,  # model inversion of a trained model (observed: model)
    "gmi": GMI,  # model inversion with a GAN prior trained on auxiliary data (fit_prior first)
    "kedmi": KEDMI,  # model inversion: a GAN that knows the target's soft labels, a latent distribution per class
    "plgmi": PLGMI,  # model inversion: a conditional GAN on pseudo-labelled public data, max-margin search
    "deepinversion": DeepInversion,  # model inversion from the BatchNorm statistics (data-free)
    "hitaj": Hitaj,  # an active participant: a GAN against each round's global model, fake-labelled samples
}


def make_attack(name: str, **kwargs):
    """Build the attack ``name`` with its hyper-parameters (unknown ones are refused by the dataclass)."""
    if name not in ATTACKS:
        raise ValueError(f"attack={name} is not known; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](**kwargs)
