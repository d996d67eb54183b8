import torch

MUTANTS = {
    "00.softmax": [
        ("naive exp overflows", lambda x: x.exp() / x.exp().sum(-1, keepdim=True)),
        ("wrong dimension", lambda x: torch.softmax(x, dim=0)),
        ("forgot to normalise", lambda x: (x - x.amax(-1, keepdim=True)).exp()),
    ],
}
