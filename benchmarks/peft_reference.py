"""Section 5: PEFT LoRA on the identical MLP in plain PyTorch.

This is the row a PyTorch user would otherwise pick. It runs in the torch
backend's process, interleaved with the Keras rows, and is skipped (with a
reason) when `torch` or `peft` is not importable.
"""

import importlib.util

import numpy as np


def available():
    """`None` if PEFT can run, else the reason it cannot."""
    for module in ("torch", "peft"):
        if importlib.util.find_spec(module) is None:
            return f"`{module}` is not installed"
    return None


def make_step(config, x, y, compile_model=False):
    """Returns `(step, info)`: one Adam step of PEFT LoRA on the MLP of
    `config` (`step` is `None`, and `info` says why, when PEFT is missing);
    with `compile_model`, the PEFT model under `torch.compile`.
    """
    reason = available()
    if reason is not None:
        return None, {"skipped": reason}
    import peft
    import torch

    torch.manual_seed(0)
    layers = []
    width_in = config["input_dim"]
    for _ in range(config["depth"]):
        layers += [torch.nn.Linear(width_in, config["width"]), torch.nn.ReLU()]
        width_in = config["width"]
    layers.append(torch.nn.Linear(width_in, config["classes"]))
    base = torch.nn.Sequential(*layers)
    targets = [str(2 * i) for i in range(config["depth"])]  # the hidden Linears
    lora_config = peft.LoraConfig(
        r=config["rank"], lora_alpha=config["rank"], target_modules=targets
    )
    model = peft.get_peft_model(base, lora_config)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if compile_model:
        model = torch.compile(model)
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs = torch.from_numpy(np.asarray(x))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    info = {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "trainable": int(sum(p.numel() for p in parameters)),
    }
    return step, info
