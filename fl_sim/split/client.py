"""The split-learning client: one Flower message of a client's turn. It back-propagates the gradient
the server returned for batch k-1 through its side of the model and steps, then sends the
activations of batch k (with the labels, unless it keeps the head), or, after its last batch, its
trained client-side model. Its state between messages lives in the node's ``context.state``."""

from __future__ import annotations

import copy

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig
from torch.nn import functional as F

from defenses.cut import distance_correlation
from fl_sim.faults import maybe_fail
from fl_sim.privacy import DPBudget, restore_dp
from fl_sim.split.cut import (STATE_BOTTOM, STATE_OPTIMIZER, at_the_cut, batch_plan, load_optimizer, save_optimizer,
                              split, step_seed)
from fl_sim.training import make_optimizer
from fl_sim.workspace import workspace


def client_split_step(cfg: DictConfig, msg: Message, context: Context) -> Message:
    """One split-learning message on the client: back-propagate batch k-1's gradient (k >= 1), then
    send batch k's activations, or, after the last batch, the trained client-side model.

    With ``defense=dpsgd`` the client-side model trains with DP-SGD (Opacus' per-example clipping and
    noise on its own parameters, Poisson batches): the gradient at the cut of example i only depends
    on example i, so per-example gradients of the bottom are exact. ε is accounted as in federated runs."""
    ws = workspace(cfg, "client")
    cid = int(context.node_config["partition-id"])
    x, y = ws.client_tensors(cid)
    conf = msg.content["config"]
    rnd, k = int(conf["server-round"]), int(conf["step"])
    epochs, batch_size, lr = int(conf["local-epochs"]), int(conf["batch-size"]), float(conf["lr"])
    dp = bool(cfg.defense.dpsgd)
    plan = batch_plan(len(x), epochs, batch_size, cfg.seed, rnd, cid, poisson=dp)
    work = copy.deepcopy(split(cfg, ws.model)[0]).train()  # Opacus' hooks must not stay on the workspace model
    bottom = work["bottom"]
    # one optimiser for the client side: a step only moves the part that has gradients (bottom or head)
    opt = make_optimizer(str(conf["optimizer"]), work.parameters(), lr, float(conf["momentum"]),
                         float(conf["weight-decay"]))
    if k == 0:
        restore_dp(msg, context)
    budget = DPBudget.load(context, cfg, len(x), epochs, batch_size) if dp else None
    content: dict = {"client": ConfigRecord({"partition-id": cid, "step": k, "steps": len(plan), "device": str(ws.device)})}
    if "head-input" in msg.content:  # U-shape: the client's head takes the server's output, with the labels
        work.load_state_dict(context.state[STATE_BOTTOM].to_torch_state_dict())
        if STATE_OPTIMIZER in context.state:
            load_optimizer(opt, context.state[STATE_OPTIMIZER])
        h = msg.content["head-input"].to_torch_state_dict()["input"].requires_grad_(True)
        yb = y[torch.from_numpy(plan[k])]
        loss = F.cross_entropy(work["head"](h), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        context.state[STATE_BOTTOM] = ArrayRecord({n: v.detach().cpu() for n, v in work.state_dict().items()})
        context.state[STATE_OPTIMIZER] = save_optimizer(opt)
        content["client"]["loss"] = float(loss.detach())
        content["head-gradient"] = ArrayRecord({"gradient": h.grad.detach().cpu()})
        return Message(content=RecordDict(content), reply_to=msg)
    if k == 0:
        content["client"]["delay"] = maybe_fail(cfg, rnd, cid)
        work.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        if budget is not None:
            if budget.would_exceed(len(plan)):  # out of budget: no training this round nor later
                content["privacy"] = budget.record(declined=True)
                content["metrics"] = MetricRecord({"num-examples": len(x)})
                return Message(content=RecordDict(content), reply_to=msg)
            budget.save(context)  # the noise multiplier (calibrated once) for the turn's later messages
    else:
        work.load_state_dict(context.state[STATE_BOTTOM].to_torch_state_dict())
        if STATE_OPTIMIZER in context.state:
            load_optimizer(opt, context.state[STATE_OPTIMIZER])
        net, stepper = bottom, opt
        if budget is not None:
            from opacus import GradSampleModule  # imported when used: Opacus takes seconds to import
            from opacus.optimizers import DPOptimizer

            net = GradSampleModule(bottom, loss_reduction="mean")
            device = next(bottom.parameters()).device  # Opacus draws the noise where the parameters are
            noise = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, rnd, cid, k - 1) + 1)
            stepper = DPOptimizer(opt, noise_multiplier=budget.noise_multiplier,
                                  max_grad_norm=float(cfg.defense.max_grad_norm),
                                  expected_batch_size=max(1, int(len(x) * budget.sample_rate)), generator=noise)
        idx = torch.from_numpy(plan[k - 1])
        buffers = {n: b.clone() for n, b in work.named_buffers()}  # the recomputation must not count twice
        stepper.zero_grad(set_to_none=True)
        if len(idx) == 0:  # an empty Poisson draw still takes its (pure noise) DP-SGD step
            for p in bottom.parameters():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        else:
            xb = x[idx]
            sent = at_the_cut(cfg, net(xb), rnd, cid, k - 1)
            grad = msg.content["cut-gradient"].to_torch_state_dict()["gradient"].to(sent.device)
            if cfg.defense.nopeek:  # the client's own loss term: decorrelate what it sends from its inputs
                leak = float(cfg.defense.nopeek_alpha) * distance_correlation(xb, sent)
                torch.autograd.backward([sent, leak], [grad, torch.ones_like(leak)])
            else:
                sent.backward(grad)
        stepper.step()
        if net is not bottom:
            net._close()
        with torch.no_grad():
            for n, b in work.named_buffers():
                b.copy_(buffers[n])
    if k < len(plan):
        idx = torch.from_numpy(plan[k])
        with torch.no_grad():
            a = at_the_cut(cfg, bottom(x[idx]), rnd, cid, k)
        sent = {"activations": a.detach().cpu()}
        if "head" not in work:  # labels travel with the activations unless the client keeps the head
            sent["labels"] = y[idx].cpu()
        content["activations"] = ArrayRecord(sent)
        context.state[STATE_BOTTOM] = ArrayRecord({n: v.detach().cpu() for n, v in work.state_dict().items()})
        context.state[STATE_OPTIMIZER] = save_optimizer(opt)
    else:
        content["arrays"] = ArrayRecord({n: v.detach().cpu() for n, v in work.state_dict().items()})
        content["metrics"] = MetricRecord({"num-examples": len(x)})
        if budget is not None:
            budget.spend(rnd, len(plan))
            budget.save(context)
            content["privacy"] = budget.record(declined=False)
    return Message(content=RecordDict(content), reply_to=msg)
