"""report.md and its pictures, written from summary.json's content (nothing else is read)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fl_sim.validation import MALICIOUS_ATTACKS  # noqa: E402


def _fmt(v, digits=4):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def plot_client_sizes(sizes: list[int], path: Path) -> None:
    """A histogram of the clients' training-set sizes (log-spaced bins: cross-device sizes follow a power law)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.2))
    lo, hi = max(1, min(sizes)), max(sizes)
    bins = np.unique(np.geomspace(lo, hi + 1, 30).astype(int)) if hi > lo else [lo, lo + 1]
    ax.hist(sizes, bins=bins)
    ax.set_xscale("log")
    ax.set_xlabel("training examples per client")
    ax.set_ylabel("clients")
    ax.set_title(f"{len(sizes):,} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(rounds: list[dict], path: Path) -> None:
    r = [e["round"] for e in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    if any(e.get("train_loss") is not None for e in rounds):
        ax1.plot(r, [e.get("train_loss") for e in rounds], "o-", label="train (clients' mean)")
    ax1.plot(r, [e["test_loss"] for e in rounds], "s-", label="test (global model)")
    ax1.set_xlabel("round")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(r, [100 * e["test_accuracy"] for e in rounds], "s-", color="C2")
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy (%)")
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rounds_table(rounds: list[dict]) -> str:
    lines = ["| round | clients (trained) | train loss | test loss | test accuracy | seconds |",
             "|---:|---:|---:|---:|---:|---:|"]
    for e in rounds:
        trained = f" ({e['trained']})" if e.get("trained", len(e["clients"])) != len(e["clients"]) else ""
        lines.append(f"| {e['round']} | {len(e['clients'])}{trained} | {_fmt(e.get('train_loss'))} | "
                     f"{_fmt(e['test_loss'])} | {_fmt(e['test_accuracy'])} | {_fmt(e['seconds'], 2)} |")
    return "\n".join(lines)


def model_inversion_section(summary: dict) -> list[str]:
    """Model inversion of the final model, or of each round's model by a participant (``attack.on=client``):
    the threat model, the division, the judge, the scores, the pictures."""
    mi = summary["model_inversion"]
    d, judge, prior = mi["division"], mi["evaluation_classifier"], mi["prior"] or {}
    by_client = mi.get("on") == "client"
    trained = "loaded from the cache" if prior.get("cached") else f"trained in {prior.get('seconds', 0.0):.1f} s"
    aux = (f"the public classes {d['public_classes']} ({d['auxiliary_examples']} training images; no class in common "
           f"with the private ones)" if d["auxiliary"] == "disjoint_classes" else
           f"a disjoint {d['auxiliary_fraction']:g} of the private classes' training pool ({d['auxiliary_examples']} images)")
    title = ("## Attacks: model inversion by a participant, round by round" if by_client else
             "## Attacks: model inversion of the final model")
    holds = (f" Client {d['attacker_client']}'s own partition holds the classes {d['attacker_classes']}; it attacks "
             "the others." if by_client else "")
    out = [title, "",
           f"Attacker: {mi['attacker']}, white-box. The clients trained on the private classes {d['private_classes']} "
           f"(`{mi['target']['model']}`, final test accuracy {_fmt(mi['target']['test_accuracy'])}); the attacker's "
           f"auxiliary data: {aux}.{holds}", ""]
    entries = [a for a in summary.get("attacks") or [] if a.get("observed") == "model"]
    bf16 = (" Forward passes in bfloat16 (`attack.precision=bfloat16`: autocast; latents, images and losses in "
            "float32)." if any(a.get("precision") == "bfloat16" for a in entries) else "")
    if judge is None:  # a participant never sampled in the attacked rounds
        return out + ["The attacker was not sampled in any attacked round: nothing was attacked.", ""]
    out += [f"Evaluation classifier (the evaluator's, never the attack's): {judge['architecture']}, trained on "
            f"{judge['trained_on']}, {judge['classes']} classes, test accuracy {_fmt(judge['test_accuracy'])}"
            f"{' (cached)' if judge['cached'] else ''}." + (f" GAN prior: {trained}." if prior.get("prior") else "")
            + bf16, ""]
    if by_client:
        out += ["| round | model's test acc. | attack | classes | images | attack acc. | top-5 | KNN dist. | "
                "feature FID | nearest PSNR | seconds |", "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for a in entries:
            out.append(f"| {a['round']} | {_fmt(a.get('target_test_accuracy'))} | {a['attack']} | {a['target_classes']} | "
                       f"{a['batch_size']} | {_fmt(a['attack_accuracy'], 3)} | {_fmt(a['attack_accuracy_top5'], 3)} | "
                       f"{_fmt(a['knn_distance'], 2)} | {_fmt(a['feature_fid'], 2)} | {_fmt(a['nearest_psnr'], 2)} | "
                       f"{_fmt(a['seconds'], 1)} |")
    else:
        out += ["| attack | classes | images | attack acc. | top-5 | KNN dist. | feature FID | nearest PSNR | "
                "nearest SSIM | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in entries:
            out.append(f"| {a['attack']} | {a['target_classes']} | {a['batch_size']} | {_fmt(a['attack_accuracy'], 3)} | "
                       f"{_fmt(a['attack_accuracy_top5'], 3)} | {_fmt(a['knn_distance'], 2)} | "
                       f"{_fmt(a['feature_fid'], 2)} | {_fmt(a['nearest_psnr'], 2)} | {_fmt(a['nearest_ssim'], 3)} | "
                       f"{_fmt(a['seconds'], 1)} |")
    out += [""] + [f"- {n}" for n in mi.get("notes", [])] + [""]
    shown = entries[-1:] if by_client else entries  # round by round: the last attacked round's pictures
    for a in shown:
        acc = ", ".join(f"{c}: {v:.2f}" for c, v in a["attack_accuracy_per_class"].items())
        when = f", round {a['round']}" if by_client else ""
        out += [f"Attack accuracy per class ({a['attack']}{when}): {acc}. Each picture: reconstructions (top) above "
                "the private training image nearest to each in the evaluation classifier's features (bottom)."
                + (" The earlier rounds' pictures are in the run directory (`inversion_*_round*_class*.png`)."
                   if by_client and len(entries) > 1 else ""), ""]
        out += [f"![{p}]({p})" for p in a.get("pictures", [])] + [""]
    return out


ATTACK_ROWS = 50  # beyond this many attack entries, the report summarises them per round


def attacks_section(summary: dict) -> list[str]:
    attacks = summary.get("attacks") or []
    cfg = summary["config"]["attack"]
    out = ["## Attacks", ""]
    if cfg["name"] == "none":
        return out + ["No attack was configured (honest server).", ""]
    if summary.get("model_inversion"):
        return model_inversion_section(summary)
    split = summary["config"].get("scenario", {}).get("name") == "split"
    u_shape = split and bool(summary["config"]["scenario"].get("head_layer"))
    labels = ("kept by the client (U-shape)" if u_shape else "sent with the activations") if split else \
        ("known to the server" if cfg["labels_known"] else "recovered by the attack")
    out += [f"Attack `{cfg['name']}` by {'a malicious' if cfg['name'] in MALICIOUS_ATTACKS else 'an honest-but-curious'} "
            f"server on clients {cfg['target_clients'] or 'all sampled'}; labels {labels}. "
            "PSNR (dB) and SSIM on [0, 1] images after Hungarian matching of reconstructions to the client's "
            "examples; label accuracy over the label multiset. LPIPS is not computed (no local network weights).",
            "",
            "| round | client | observed | examples | PSNR | SSIM | label acc. | iterations | seconds |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    listed = attacks
    if len(attacks) > ATTACK_ROWS:  # many targets: per round, then the best reconstructions
        out[-2:] = ["| round | targets | mean PSNR | best PSNR | targets at 20 dB or more | failed |",
                    "|---:|---:|---:|---:|---:|---:|"]
        for rnd in sorted({a["round"] for a in attacks}):
            these = [a for a in attacks if a["round"] == rnd]
            ok = [a["psnr"] for a in these if a.get("psnr") is not None]
            out.append(f"| {rnd} | {len(these)} | {_fmt(sum(ok) / len(ok) if ok else None, 2)} | "
                       f"{_fmt(max(ok) if ok else None, 2)} | {sum(p >= 20 for p in ok)} | {len(these) - len(ok)} |")
        listed = sorted((a for a in attacks if a.get("psnr") is not None), key=lambda a: -a["psnr"])[:10]
        out += ["", f"The {len(listed)} best of the {len(attacks):,} reconstructions (every one is in summary.json):",
                "", "| round | client | observed | examples | PSNR | SSIM | label acc. | iterations | seconds |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for a in listed:
        if a.get("error"):
            out.append(f"| {a['round']} | {a['client']} | {a['observed']} | {a['batch_size']} | failed: {a['error']} |||||")
            continue
        out.append(f"| {a['round']} | {a['client']} | {a['observed']} | {a['batch_size']} | {_fmt(a['psnr'], 2)} | "
                   f"{_fmt(a['ssim'], 3)} | {_fmt(a['label_accuracy'], 2)} | {a['iterations']} | {_fmt(a['seconds'], 1)} |")
    for s in summary.get("attacks_skipped") or []:
        out.append(f"| {s['round']} | {s['client']} | skipped: {s['reason']} |||||||")
    out.append("")
    for a in listed:
        if a.get("picture"):
            out += [f"![round {a['round']} client {a['client']}]({a['picture']})", ""]
    return out


def _nodes(sim: dict) -> str:
    k = sim.get("clients_per_node", 1)
    return f"; simulated on {sim['nodes']:,} nodes of up to {k} clients each (cohorts)" if k > 1 else ""


PRIVACY_ROWS = 20  # beyond this many clients, the report summarises ε over them


def _eps(v, infinite=False):
    return "∞" if infinite or v is None else f"{v:.3f}"


def privacy_section(p: dict | None) -> list[str]:
    out = ["## Privacy", ""]
    if p is None:
        return out + ["No differential privacy: ε = ∞.", ""]
    out += [f"Mechanism `{p['mechanism']}`, accountant `{p['accountant']}`, δ = {p['delta']:g}; "
            f"worst client ε = **{_eps(p['epsilon'], p['infinite'])}**"
            + (f" (budget max_epsilon = {p['max_epsilon']:g})" if p.get("max_epsilon") is not None else "") + ".", ""]
    if p.get("sampling"):  # central DP with client sampling: the amplified bound beside the upper bound
        smp = p["sampling"]
        out += [f"Replace-one neighbours (the relation fixed-size sampling is analysed in): ε = "
                f"**{_eps(p['epsilon_sampled'])}** with the amplification by sampling {smp['sample_size']} of "
                f"{smp['population']:,} clients a round (against whoever sees only the released models), "
                f"{_eps(smp['epsilon_without_sampling'])} without it.", ""]
    out += [f"- {n}" for n in p.get("notes", [])] + [f"- model changed for DP: {c}" for c in p.get("model_changes", [])]
    sampled = bool(p.get("sampling"))
    out += ["", "| round | ε (worst client so far) |" + (" ε with sampling |" if sampled else ""),
            "|---:|---:|" + ("---:|" if sampled else "")]
    out += [f"| {r['round']} | {_eps(r['epsilon'], r['infinite'] or r['epsilon'] is None)} |"
            + (f" {_eps(r.get('epsilon_sampled'))} |" if sampled else "") for r in p.get("epsilon_per_round", [])]
    clients = p.get("clients", {})
    if len(clients) > PRIVACY_ROWS:  # ε over the clients, and the ones that spent most
        # ε null in summary.json is infinite (no noise): it ranks above every finite ε
        eps = sorted((math.inf if v["epsilon"] is None else v["epsilon"], c) for c, v in clients.items())
        trained = sorted(len(v["rounds"]) for v in clients.values())
        shown = [_eps(e, not math.isfinite(e)) for e in (eps[0][0], eps[len(eps) // 2][0], eps[-1][0])]
        out += ["", f"ε over the {len(eps):,} clients that trained: min {shown[0]}, median "
                f"{shown[1]}, max {shown[2]}; rounds trained per client: min {trained[0]}, "
                f"median {trained[len(trained) // 2]}, max {trained[-1]}. The {PRIVACY_ROWS} that spent most:"]
        clients = {c: clients[c] for _, c in eps[::-1][:PRIVACY_ROWS]}
    out += ["", "| client | ε | rounds trained | noise multiplier | sample rate |", "|---:|---:|---|---:|---:|"]
    for c, v in clients.items():
        out.append(f"| {c} | {_eps(v['epsilon'])} | {', '.join(map(str, v['rounds']))} | {v['noise_multiplier']:.4g} | "
                   f"{v['sample_rate']:.4g} |")
    if p.get("central"):  # central DP stacked on DP-SGD: a second, user-level guarantee
        c = p["central"]
        out.append(f"\nAlso `{c['mechanism']}` (user-level): ε = {_eps(c['epsilon'], c['infinite'])} at "
                   f"δ = {c['delta']:g}"
                   + (f" (with sampling: {_eps(c['epsilon_sampled'])})" if c.get("sampling") else "") + ". "
                   + " ".join(c.get("notes", [])))
    for st in p.get("stopped", []):
        out.append(f"\nClient {st['client']} stopped training at round {st['round']}: its next round would have "
                   f"exceeded max_epsilon (ε spent: {_eps(st['epsilon'])}); the run went on without it.")
    return out + [""]


def where_they_ran(devices: dict, cuda: dict | None = None) -> str:
    """"server cpu; clients cuda; attacks cuda (CUDA: NVIDIA H200)": each party's devices, and which
    CUDA devices the driver saw when a party used one."""
    parts = [f"{party} {', '.join(d)}" for party, d in devices.items() if d]
    text = "; ".join(parts) or "—"
    if cuda and any(x.startswith("cuda") for d in devices.values() for x in d):
        text += f" (CUDA {cuda.get('version')}: {', '.join(cuda.get('devices', []))})"
    return text


def write_report(run_dir: Path, summary: dict) -> Path:
    run_dir = Path(run_dir)
    cfg = summary["config"]
    rounds = summary["rounds"]
    if rounds:
        plot_training_curves(rounds, run_dir / "training_curves.png")
    t = summary["timing"]
    data = summary.get("data") or {}
    model = summary.get("model") or {}
    out = [
        "# fl-sim run report",
        "",
        f"Status: **{summary['status']}**" + (f" — {summary['error']}" if summary.get("error") else ""),
        "",
        "## Setting",
        "",
        "| | |",
        "|---|---|",
        f"| scenario | {cfg['scenario']['name']} |",
        f"| dataset | {cfg['dataset']['name']} ({data.get('num_train', '?')} train / {data.get('num_test', '?')} "
        f"test, input {'x'.join(map(str, data.get('input_shape', [])))}, {data.get('num_classes', '?')} classes) |",
        f"| model | {cfg['model']['name']} ({model.get('parameters', 0):,} parameters) |",
        f"| clients | {cfg['num_clients']}, partition {cfg['partition']['name']}, "
        f"fraction per round {cfg['strategy']['fraction_train']}{_nodes(summary.get('simulation') or {})} |",
        f"| strategy | {cfg['strategy']['name']} |",
        f"| local training | {cfg['client']['optimizer']}, lr {cfg['client']['lr']}, batch {cfg['client']['batch_size']}, "
        f"{cfg['client']['local_epochs']} epoch(s) |",
        f"| rounds | {cfg['num_rounds']} |",
        f"| attack | {cfg['attack']['name']} |",
        f"| defense | {cfg['defense']['name']} |",
        *[f"| model change | {c} |" for c in model.get("defense_changes", [])],
        f"| seed | {cfg['seed']} |",
        *([f"| ran on | {where_they_ran(summary['devices'], (summary.get('versions') or {}).get('cuda'))} |"] if summary.get("devices") else []),
        "",
        "## Training",
        "",
        rounds_table(rounds),
        "",
    ]
    if rounds:
        out += ["![training curves](training_curves.png)", ""]
    out += [
        f"Total {t['total_seconds']:.1f} s; simulation {t['simulation_seconds']:.1f} s"
        + (f" (Ray start-up {t['startup_seconds']:.1f} s)" if t.get("startup_seconds") else "") + ".",
        "",
    ]
    if data.get("clients"):
        out += ["## Clients", "", "| client | examples | label histogram |", "|---:|---:|---|"]
        for c in data["clients"]:
            out.append(f"| {c['client']} | {c['size']} | {' '.join(map(str, c['labels']))} |")
        out.append("")
    elif (data.get("client_sizes") or {}).get("each"):  # too many clients for a row each: their spread
        z = data["client_sizes"]
        plot_client_sizes(z["each"], run_dir / "client_sizes.png")
        out += ["## Clients", "", f"{len(z['each']):,} clients hold {z['min']} to {z['max']} training examples "
                f"(median {z['median']:g}, mean {z['mean']:.1f}); labels over all clients: "
                f"{' '.join(map(str, data.get('label_totals', [])))}.", "", "![client sizes](client_sizes.png)", ""]
    out += privacy_section(summary.get("privacy"))
    out += attacks_section(summary)
    path = run_dir / "report.md"
    path.write_text("\n".join(out))
    return path
