"""Defaults for training and for every rank-selection method, in one place.

The spec validator (search_spaces), the CLI and `fit` all read these tables, so a
hyperparameter exists exactly when it is listed here. Values follow the papers (each method's
module docstring says where, and README's rank-selection table lists them) and can be
overridden per run.
"""

METHODS = ("bayesian", "l0", "lwiq", "fixed", "posthoc", "dense")

TRAIN_DEFAULTS = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 5e-3,  # factorized layers trained from scratch need more than dense nets: 1e-3 reached 43 % (tt) on digits in 8 epochs, 5e-3 91 %
    "optimizer": "adam",  # adam | sgd
    "momentum": 0.9,  # sgd only
    "weight_decay": 0.0,
    "schedule": "cosine",  # cosine | none
    "finetune_epochs": 2,  # after pruning to the budget, at a restarted lr schedule
    "max_rank": 16,
    # embedding tables: updated inside backward on the touched rows / core slices only (TorchRec-style);
    # auto = the model's own default (DLRM: rowwise_adagrad), none = tables train with `optimizer`
    "table_optimizer": "auto",  # auto | none | rowwise_adagrad | sgd | adam
    "table_lr": 0.05,
    "seed": 0,
}

# The budget-aware search of bayesian and l0 (schedule.py) and how their cuts weigh cost (budget.py).
BUDGET_SEARCH = {
    "budget_aware": True,  # drive the model to the budget during the search (schedule.py); paper: off
    "cut_start": 0.2,  # gradual cuts from this fraction of the search epochs ...
    "cut_end": 0.8,  # ... to this one, where the model reaches the budget and trains on at it
    "dual_lr": 0.6,  # step of the dual variable per epoch (times the log-ratio of kept to budget parameters)
    # cuts drop the lowest importance / (parameters saved)**cost_power; 0: importance alone, since the
    # penalties already charge a slice's size (L0: expected parameters, Bayesian: KL summed over entries)
    # and 0.5 starved the MLP's first layer on full MNIST (Bayesian TTM 1 %: first layer [6, 4, 2], README)
    "cost_power": 0.0,
    "cost_scope": "layer",  # layer: cost compares layers, importance alone picks within one | edge
    "preset": "default",  # default | paper (the paper's exact settings, PRESETS below)
}

METHOD_DEFAULTS = {
    "bayesian": {
        "inference": "svi",  # svi (learned posterior scale, the paper) | map (the authors' code)
        "hyperprior": "log_uniform",  # log_uniform (their MNIST scripts) | half_cauchy (their DLRM runs)
        "eta": 0.1,  # half-Cauchy scale (their DLRM runs)
        "kl_weight": 5e-5,  # times the summed KL, added to the mean task loss; 1/N_train = exact ELBO
        "warmup_epochs": 1,  # epochs with KL weight 0 ...
        "ramp_epochs": 2,  # ... then linear up to kl_weight over this many epochs
        "damping": 1.0,  # lambda^2 <- (1-s) lambda^2 + s * closed-form update, after every step (theirs: 1)
        "threshold": 1e-2,  # slices with lambda^2 at or below this times the edge's largest are dropped
        "init_log_sigma": -8.0,  # svi: posterior std starts tiny (exp(-8)), near the MAP point
        "search_fraction": 0.5,  # of train.epochs searched with the prior; the pruned model trains the rest
        "max_kl_boost": 100.0,  # cap of the KL weight's dual multiplier
        # stop the prior (lambda^2 fixed, no KL, no sampling) once the slices above the threshold fit the budget
        "freeze_at_target": True,
        **BUDGET_SEARCH,
    },
    "l0": {
        "lam": 1.0,  # times E[params]/params at max rank (paper: 0.1-1 on a per-edge count summed over edges)
        "sigma": 0.5,  # gate noise std in training (paper, LeNet-5)
        "shift": 1.2,  # gate = clip(mu + shift + sigma*eps, 0, 1); mu starts at 0, so gates start open
        "gate_lr": 1e-3,  # lr of the gate means (theirs: the same Adam lr as the weights)
        "freeze_at_target": True,  # stop training gates once eval gates meet the budget
        "search_fraction": 0.5,  # of train.epochs searched with the gates; the pruned model trains the rest
        **BUDGET_SEARCH,
        # no dual by default: raised to ~13x lam on full MNIST it closed every gate of the MLP's costliest
        # TTM edge at once (first layer [15, 1, 5], -0.5 points); the gradual cuts reach the budget alone
        "dual_lr": 0.0,
    },
    "lwiq": {
        # ordinary training before measuring, so features mean something; a fraction (e.g. 0.5) stops partway
        # through the first epoch (a float, so that specs and --param accept fractions)
        "warmup_epochs": 1.0,
        "measure_batches": 8,  # held-out batches: half imprint the proxy classifiers, half score them
        "pool_features": 512,  # pooled feature size per layer (conv maps keep a coarse grid within it)
        "refit": True,  # start: tensorized: decompose the warmed-up layers at the allocated ranks (False: keep the largest slices)
        "min_share": 0.05,  # floor of each layer's significance, relative to the top layer, so no layer starves
        "start": "tensorized",  # tensorized: warm up the max-rank model | dense: the paper (measure a trained net, decompose)
        "preset": "default",  # default | paper (start dense, PRESETS below)
    },
    "fixed": {},
    "posthoc": {},
    "dense": {},
}

# `preset: paper` (CLI `--param preset=paper`): the papers' own settings, so faithfulness stays
# measurable. A preset fills in what the run leaves at its default; a value set to anything else wins.
PRESETS = {
    "bayesian": {"paper": {"budget_aware": False, "freeze_at_target": False, "inference": "svi", "hyperprior": "log_uniform",
                           "kl_weight": 5e-5, "threshold": 1e-2, "cost_power": 0.0}},
    "l0": {"paper": {"budget_aware": False, "lam": 0.1, "sigma": 0.5, "shift": 1.2, "freeze_at_target": True,
                     "cost_power": 0.0}},
    # min_share 0.25: measured on a trained net, an MLP's first layer imprints worse than the raw pixels
    # (gain -2 points on mnist14), so the floor alone sets its rank; at 0.05 it fell to rank 1 and stopped learning
    "lwiq": {"paper": {"start": "dense", "warmup_epochs": 2, "min_share": 0.25}},
}
