"""Split learning on Flower's Simulation Engine (``scenario=split``): the same Ray simulation, ServerApp
and ClientApp as federated runs, with one Flower message per training step.

The model is cut after ``scenario.cut_layer``: the client keeps the bottom, the server the top.
Per batch the client runs the bottom on its data and sends the activations and labels; the server
runs the top, takes the loss, steps its own optimiser and returns the gradient at the cut; the
client back-propagates it through the bottom and steps. One message carries the gradient of batch
k-1 and asks for the activations of batch k, so a client's turn of K batches costs K+1 messages.

Modes (``scenario.mode``):

- ``vanilla`` (Gupta & Raskar 2018): the sampled clients take turns, in client order; the client-side
  model passes from one client to the next, relayed by the server (their centralised mode).
- ``splitfed`` (Thapa et al., "SplitFed", AAAI 2022, SFLV2): the sampled clients train in parallel
  from the same client-side model; the server processes their batches one after the other on a
  single server-side model (in client order) and averages the client-side models with Flower's
  FedAvg at the end of the round.

Client state between messages lives in the node's ``context.state`` (a Ray actor is not tied to a
client): the bottom's weights and optimiser state. The client recomputes the forward pass of batch
k-1 when its gradient arrives (the batch order is seeded by (seed, round, client), the cut
defenses' randomness by (seed, round, client, batch)), so nothing but records crosses messages.

What the server observes is the activations (``observed: "activations"``); attacks on them
(``rmle``, ``inverse_network``, ``unsplit``) run after the round on the batch ``attack.batch`` of each
targeted client's turn, with the client-side weights the server sent at the start of that turn
(white box for rMLE: exact for batch 0). ``fsha`` (a malicious server) returns its hijacking
gradient instead of the honest one for every batch, and decodes the targeted batch at once.

The package is the split client/server pair: ``cut`` (where the model is cut, the batch plan and
what crosses the cut), ``client`` (one message of a client's turn) and ``server`` (the server's
model, the attacks on what it observes, and the training loop).
"""
